"""The shipped cluster under two arrival patterns, for choosing thread counts.

  burst:      32 streams at once (as throughput.py's row (d)), 2 bursts
  staggered:  48 streaming chat requests, one every 150 ms, 64 tokens each:
              tokens/s over the whole run, median time to first token and end to end

Each --set is a JSON override of configs/local.yaml, measured on a cluster of its own:

  .venv/bin/python benchmarks/arrivals.py --set '{}' \
      --set '{"prefill": {"num_threads": 2}}' --set '{"decode": {"num_threads": 1}}'

Writes benchmarks/results/arrivals.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
from throughput import QUESTIONS, http_rate, stream_chat  # noqa: E402


async def staggered(url: str, n: int = 64, count: int = 48, gap_s: float = 0.15) -> dict:
    async def one(client, q, delay):
        await asyncio.sleep(delay)
        first, total, used = await stream_chat(client, url, q, n)
        assert used == n, used
        return first, total

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=128)) as c:
        t = time.perf_counter()
        res = await asyncio.gather(
            *[one(c, QUESTIONS[i % len(QUESTIONS)], i * gap_s) for i in range(count)]
        )
        dt = time.perf_counter() - t
    return {
        "tok_per_s": count * n / dt,
        "median_ttft_s": statistics.median(r[0] for r in res),
        "median_e2e_s": statistics.median(r[1] for r in res),
    }


def main() -> None:
    from tests.support import load_test_config, running_cluster

    ap = argparse.ArgumentParser()
    ap.add_argument("--set", action="append", default=[], help="JSON override of local.yaml")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "arrivals.json"))
    args = ap.parse_args()
    results = []
    for over in args.set or ["{}"]:
        cfg = load_test_config("local.yaml", router={"port": 8014}, **json.loads(over))
        with running_cluster(cfg) as rc:
            burst = asyncio.run(http_rate(rc.url, 64, 32, reps=2))
            stag = asyncio.run(staggered(rc.url))
        results.append({"override": json.loads(over), "burst_tok_per_s": burst, "staggered": stag})
        print(
            f"{over:40s} burst {', '.join(f'{b:.1f}' for b in burst)} tok/s | staggered "
            f"{stag['tok_per_s']:.1f} tok/s, median TTFT {stag['median_ttft_s'] * 1000:.0f} ms, "
            f"median e2e {stag['median_e2e_s']:.2f} s",
            flush=True,
        )
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
