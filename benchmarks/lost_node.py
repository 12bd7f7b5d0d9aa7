"""Nodes lost for good, against a fresh cluster of the surviving size, in one run.

Two clusters are up at once on this machine, both with configs/chaos.yaml's tiny model and
chaos load (8 streaming clients x 32 tokens):

- A: configs/chaos.yaml, 2 prefill + 2 decode replicas each on its own local node. The head's
  Ray processes (GCS, raylet, agents, monitors) are measured idle over 10 s; then
  `pdcluster chaos`'s lose-node fault kills a decode node, then a prefill node, replaces
  neither, and ends when Ray has marked both dead; once /health shows the survivors healthy,
  the head is measured idle again, and once more after the load below.
- B: a fresh cluster of the surviving size (the same config with one node and one replica
  per role), started by `pdcluster up` in a process of its own.

Then the load runs on A and B in turns (`--rounds` x `--window` seconds each, which one goes
first alternating), so that the machine's drift (two shared cores) falls on both alike:
goodput (completed requests per second, the first second of each window left out) and p50
latency per cluster. Last, A's lost nodes come back and its lost replicas must be served
again (time to every replica healthy).

  flock /tmp/pdcluster-cluster.lock .venv/bin/python benchmarks/lost_node.py

Writes benchmarks/results/lost_node.json.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chaos import harness  # noqa: E402
from chaos.load import Load, percentile  # noqa: E402
from chaos.scenarios import SCENARIOS  # noqa: E402
from chaos.target import HealthMonitor, Target  # noqa: E402
from tests.support import load_test_config, running_cluster  # noqa: E402
from wire.host import cpu_model  # noqa: E402

SURVIVORS = {
    "cluster": {
        "nodes": [
            {"name": "prefill-0", "num_cpus": 1, "resources": {"prefill_node": 1}},
            {"name": "decode-0", "num_cpus": 1, "resources": {"decode_node": 1}},
        ]
    },
    "prefill": {"replicas": 1},
    "decode": {"replicas": 1},
    "router": {"port": 8025},
}


def _fresh_cluster(tmp: Path) -> tuple[subprocess.Popen, str]:
    """B: `pdcluster up` with the surviving size, once it answers /health."""
    data = yaml.safe_load((ROOT / "configs" / "chaos.yaml").read_text())
    for key, over in SURVIVORS.items():
        data[key] = {**data.get(key, {}), **over}
    path = tmp / "fresh.yaml"
    path.write_text(yaml.safe_dump(data))
    log = open(tmp / "fresh.log", "w")
    proc = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "pdcluster"), "up", str(path)], stdout=log, stderr=log
    )
    url, deadline = "http://127.0.0.1:8025", time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).json().get("status") == "ok":
                return proc, url
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    raise RuntimeError(f"the fresh cluster did not come up: see {tmp / 'fresh.log'}")


def _window(url: str, shape, seconds: float) -> list:
    load = Load(url, shape).start()
    time.sleep(seconds)
    load.stop()
    return [r for r in load.records if r.end >= load.started_at + harness.RAMP_S]


def _figures(records: list, seconds: float) -> dict:
    done = [r for r in records if r.completed]
    return {
        "goodput_rps": round(len(done) / seconds, 2),
        "p50_s": round(percentile([r.latency for r in done], 50), 3),
        "requests": len(done),
        "failed": len(records) - len(done),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--window", type=float, default=10.0, help="seconds of load per turn")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lost_node.json"))
    args = ap.parse_args()
    out = {"cpu": cpu_model(), "command": " ".join(sys.argv), "created": time.time()}
    sc = SCENARIOS["lose-node"]
    head_s = sc.params["head_window_s"]

    with tempfile.TemporaryDirectory() as tmp:
        fresh, fresh_url = _fresh_cluster(Path(tmp))
        try:
            cfg = load_test_config("chaos.yaml", router={"port": 8024})
            with running_cluster(cfg) as rc:
                t = Target(cfg, rc.url, rc)
                h = harness.Harness(t, seed=0, progress=print)
                try:
                    h.run_baseline()
                    ok, _, why = t.wait_settled(cfg.chaos.settle_s)
                    assert ok, why
                    out["head_cpu_before"] = round(t.head_cpu(head_s)[0], 3)
                    w = sc.fault(t, sc, random.Random(0))
                    print(f"lost: {w.target}; dead after {w.end - w.start:.1f} s", flush=True)
                    monitor = HealthMonitor(t)
                    while not monitor.all_healthy(t.health(), w.lost):
                        time.sleep(0.5)
                    cores, by = t.head_cpu(head_s)
                    out["head_cpu_after"], out["head_cpu_after_by"] = round(cores, 3), by
                    turns = {rc.url: [], fresh_url: []}
                    for k in range(args.rounds):
                        for url in (rc.url, fresh_url)[:: 1 if k % 2 == 0 else -1]:
                            turns[url] += _window(url, h.shape, args.window)
                            print(f"round {k}: {url} {len(turns[url])} requests", flush=True)
                    out["head_cpu_later"] = round(t.head_cpu(head_s)[0], 3)
                    span = args.rounds * (args.window - harness.RAMP_S)
                    out["lost"] = _figures(turns[rc.url], span)
                    out["fresh"] = _figures(turns[fresh_url], span)
                    t0 = time.monotonic()
                    t.restore_lost()
                    ok, _, why = t.wait_settled(cfg.chaos.settle_s)
                    out["restored"] = {"ok": ok, "why": why, "s": round(time.monotonic() - t0, 1)}
                finally:
                    t.close()
        finally:
            fresh.send_signal(signal.SIGINT)
            fresh.wait(60)

    out["goodput_ratio"] = round(out["lost"]["goodput_rps"] / out["fresh"]["goodput_rps"], 3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"\n{out['cpu']}; {out['command']}")
    print(
        f"head's Ray processes, idle: {out['head_cpu_before']:.1%} of a core before the loss, "
        f"{out['head_cpu_after']:.1%} in the 10 s after ({out['head_cpu_after_by']}), "
        f"{out['head_cpu_later']:.1%} after the load"
    )
    print("| cluster | goodput (req/s) | p50 | requests |\n|---|---|---|---|")
    for name, r in (("2+2 after the loss", out["lost"]), ("fresh 1+1", out["fresh"])):
        print(f"| {name} | {r['goodput_rps']} | {r['p50_s']} s | {r['requests']} |")
    print(f"survivors / fresh goodput: {out['goodput_ratio']:.2f}; restored: {out['restored']}")


if __name__ == "__main__":
    main()
