"""Test helpers: configs with overrides, a running cluster, waiting for idle.

Ray on two cores is slow to start, so each module that needs a cluster starts
one (module scope) and shares it across its tests."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import httpx
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parents[1]


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def load_test_config(name: str, **overrides):
    """A config from configs/ with nested overrides, validated like any other."""
    from cluster.config import parse_config

    data = yaml.safe_load((ROOT / "configs" / name).read_text())
    return parse_config(_merge(data, overrides))


@contextlib.contextmanager
def running_cluster(cfg):
    """Start the whole system (Ray nodes, workers, Serve router) and stop it after."""
    from cluster.launcher import start

    rc = start(cfg)
    try:
        yield rc
    finally:
        rc.shutdown()


def wait_idle(url: str, timeout: float = 30.0) -> dict:
    """Poll /debug/state until every count is back at zero; return the last state."""
    deadline = time.monotonic() + timeout
    keys = (
        "requests_in_flight",
        "prefill_leases",
        "prefill_pinned_blocks",
        "transfer_pending",
        "decode_blocks_used",
    )
    while True:
        state = httpx.get(f"{url}/debug/state", timeout=10).json()
        if all(state[k] == 0 for k in keys) or time.monotonic() > deadline:
            return state
        time.sleep(0.2)
