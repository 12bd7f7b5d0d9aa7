"""Where a running cluster's memory goes, per process: `python -m chaos.memtrace`.

Attached to a cluster (its Ray address) while load runs, it starts tracemalloc in the
router replicas, Serve's proxy and every worker's rank 0 through Ray's `__ray_call__`
(nothing in the cluster's code; no cost unless this runs), takes a snapshot, another
`--seconds` later, and prints per process: the allocation sites that grew most, the
gc-tracked object counts that grew most by type, and glibc's heap (bytes in use, bytes
held; held but unused is fragmentation, which tracemalloc cannot see).
"""

from __future__ import annotations

import argparse
import time

import ray


def _start(_actor, frames: int) -> None:
    import tracemalloc

    if not tracemalloc.is_tracing():
        tracemalloc.start(frames)


def _snapshot(_actor):
    """(snapshot, object counts by type, glibc heap), kept in the process for `_diff`."""
    import builtins
    import collections
    import gc
    import tracemalloc

    gc.collect()
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, __file__)])
    types = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
    builtins.__dict__.setdefault("_pdcluster_memtrace", []).append((snap, types, _glibc()))


def _glibc() -> tuple[int, int]:
    """(bytes in use, bytes held) by glibc's malloc in every arena, mmapped chunks included."""
    import ctypes

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd "
                    "usmblks fsmblks uordblks fordblks keepcost".split()]  # fmt: skip

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = Mallinfo2
        m = libc.mallinfo2()
    except (OSError, AttributeError):  # not glibc >= 2.33
        return 0, 0
    return m.uordblks + m.hblkhd, m.arena + m.hblkhd


def _diff(_actor, top: int) -> str:
    import builtins
    import os
    import tracemalloc

    (a, ta, ga), (b, tb, gb) = builtins.__dict__.pop("_pdcluster_memtrace")[-2:]
    tracemalloc.stop()
    stats = b.compare_to(a, "traceback")
    lines = [
        f"pid {os.getpid()}: traced {sum(s.size_diff for s in stats) / 2**20:+.2f} MB; glibc in "
        f"use {(gb[0] - ga[0]) / 2**20:+.2f} MB, held {(gb[1] - ga[1]) / 2**20:+.2f} MB "
        f"(now {gb[0] / 2**20:.1f} of {gb[1] / 2**20:.1f} MB)"
    ]
    for s in stats[:top]:
        lines.append(f"  {s.size_diff / 1e3:+9.1f} kB {s.count_diff:+7d} blocks")
        lines += [f"      {f.filename}:{f.lineno}" for f in s.traceback[-4:]]
    grown = sorted(((tb[k] - ta.get(k, 0), k) for k in tb), reverse=True)[:top]
    lines.append("  objects: " + ", ".join(f"{k} {n:+d}" for n, k in grown if n))
    return "\n".join(lines)


def _actors() -> dict[str, object]:
    out = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        name, ns = a["name"], a["namespace"]
        if ns == "serve" and (name.startswith("SERVE_PROXY_ACTOR") or "#Router#" in name):
            out[name] = ray.get_actor(name, namespace=ns)
        elif ns == "pdcluster" and name.endswith("-rank0"):
            out[name] = ray.get_actor(name, namespace=ns)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m chaos.memtrace", description=__doc__)
    ap.add_argument("--ray-address", default="auto")
    ap.add_argument("--seconds", type=float, default=300, help="between the two snapshots")
    ap.add_argument("--warm-s", type=float, default=30, help="traced before the first one")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args(argv)
    ray.init(address=args.ray_address, log_to_driver=False)
    actors = _actors()
    # Snapshots block a process for a second or more: a watchdog_s shorter than that
    # restarts workers (use a config with a longer one).
    ray.get([a.__ray_call__.remote(_start, args.frames) for a in actors.values()])
    time.sleep(args.warm_s)
    ray.get([a.__ray_call__.remote(_snapshot) for a in actors.values()])
    time.sleep(args.seconds)
    ray.get([a.__ray_call__.remote(_snapshot) for a in actors.values()])
    for name, a in actors.items():
        print(f"== {name}\n{ray.get(a.__ray_call__.remote(_diff, args.top))}")


if __name__ == "__main__":
    main()
