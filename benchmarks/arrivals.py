"""The shipped cluster under two arrival patterns, for choosing thread counts.

  burst:      32 streams at once (as throughput.py's row (d)), 2 bursts
  staggered:  48 streaming chat requests arriving as a Poisson process at 6.7/s (one every
              150 ms on average), 64 tokens each: tokens/s over the whole run, median
              time to first token and end to end

Both loads are `pdcluster bench`'s load generator (bench.main.run_point).

Each --set is a JSON override of configs/local.yaml, measured on a cluster of its own:

  .venv/bin/python benchmarks/arrivals.py --set '{}' \
      --set '{"prefill": {"num_threads": 2}}' --set '{"decode": {"num_threads": 1}}'

Writes benchmarks/results/arrivals.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from throughput import chat_load, http_rate  # noqa: E402


def staggered(url: str, n: int = 64, count: int = 48, rate: float = 1 / 0.15) -> dict:
    """`count` streaming chat requests of `n` tokens arriving as a Poisson process at
    `rate` per second (`pdcluster bench --rates`'s load)."""
    got = chat_load(url, n, count, "staggered", rate=rate)
    return {
        "tok_per_s": got["output_tok_s"],
        "median_ttft_s": got["ttft_s"]["p50"],
        "median_e2e_s": got["e2e_s"]["p50"],
    }


def main() -> None:
    from tests.support import load_test_config, running_cluster
    from wire.host import cpu_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--set", action="append", default=[], help="JSON override of local.yaml")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "arrivals.json"))
    args = ap.parse_args()
    results = []
    for over in args.set or ["{}"]:
        cfg = load_test_config("local.yaml", router={"port": 8014}, **json.loads(over))
        with running_cluster(cfg) as rc:
            burst = http_rate(rc.url, 64, 32, reps=2)
            stag = staggered(rc.url)
        results.append({"override": json.loads(over), "burst_tok_per_s": burst, "staggered": stag})
        print(
            f"{over:40s} burst {', '.join(f'{b:.1f}' for b in burst)} tok/s | staggered "
            f"{stag['tok_per_s']:.1f} tok/s, median TTFT {stag['median_ttft_s'] * 1000:.0f} ms, "
            f"median e2e {stag['median_e2e_s']:.2f} s",
            flush=True,
        )
    Path(args.out).write_text(json.dumps({"cpu": cpu_model(), "settings": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
