"""Test helpers: configs with overrides, a running cluster, waiting for idle.

Ray on two cores is slow to start, so each module that needs a cluster starts
one (module scope) and shares it across its tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
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
    """A config from configs/ with nested overrides, validated as `pdcluster up` and
    `pdcluster chaos` do (its `chaos:` section included)."""
    from chaos.config import parse_chaos_config

    data = yaml.safe_load((ROOT / "configs" / name).read_text())
    return parse_chaos_config(_merge(data, overrides))


@contextlib.contextmanager
def running_cluster(cfg):
    """Start the whole system (Ray nodes, workers, Serve router) and stop it after. As
    with `pdcluster up`, the cluster starts from the config less its `chaos:` section."""
    from chaos.config import cluster_config
    from cluster.launcher import start

    rc = start(cluster_config(cfg))
    try:
        yield rc
    finally:
        rc.shutdown()


# Every count /debug/state reports that must be back at zero when load ends.
from chaos.target import ZERO_KEYS as IDLE_KEYS  # noqa: E402


def wait_idle(url: str, timeout: float = 30.0) -> dict:
    """Poll /debug/state until every count is back at zero; return the last state."""
    deadline = time.monotonic() + timeout
    while True:
        state = httpx.get(f"{url}/debug/state", timeout=10).json()
        if all(state[k] == 0 for k in IDLE_KEYS) or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def assert_idle(url: str) -> dict:
    """Wait for idle, then assert every count is zero (naming the one that is not)."""
    state = wait_idle(url)
    for key in IDLE_KEYS:
        assert state[key] == 0, (key, state)
    return state


def hf_logprobs(hf, ids: list[int]):
    """Hugging Face's log-softmax at every position of `ids` (float32 [len(ids), vocab]):
    row i is the distribution of token i + 1, the reference for logprobs."""
    import torch

    model, _ = hf
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def assert_logprobs_match(ref, ids: list[int], entries, first: int, k: int, tol=1e-4) -> None:
    """`entries` (wire.api.TokenLogprobs) are the logprobs of ids[first], ids[first+1]...
    as `ref` (hf_logprobs of `ids`) has them: value, rank and the top k, within `tol`."""
    assert len(entries) == len(ids) - first
    for j, (lp, rank, top_ids, top_lps) in enumerate(entries):
        row, tok = ref[first + j - 1], ids[first + j]
        assert abs(lp - float(row[tok])) < tol, (first + j, lp, float(row[tok]))
        assert abs(float(row.sort(descending=True).values[rank - 1]) - lp) < tol  # its rank
        want = row.topk(k).values.tolist()
        assert len(top_ids) == len(top_lps) == k
        # The top k's values in order, and each id's own value (ties may order differently).
        assert all(abs(a - b) < tol for a, b in zip(top_lps, want))
        assert all(abs(float(row[t]) - v) < tol for t, v in zip(top_ids, top_lps))


def hf_greedy(hf, ids: list[int], n: int, **generate) -> list[int]:
    """Hugging Face `generate`'s greedy continuation of `ids`: exactly `n` tokens
    (`generate`: more of its arguments, e.g. `repetition_penalty`, `logits_processor`)."""
    import torch

    model, _ = hf
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            **generate,
        )
    return out[0, len(ids) :].tolist()


async def sse_events(response):
    """The JSON events of an SSE response, split on blank lines only: generated text
    may hold characters (U+2028, U+0085) that httpx's aiter_lines takes for line ends."""
    import json

    buf = ""
    async for text in response.aiter_text():
        buf += text
        while "\n\n" in buf:
            event, buf = buf.split("\n\n", 1)
            if event.startswith("data: {"):
                yield json.loads(event[6:])


def listening_sockets(pids) -> list[tuple[int, str]]:
    """(pid, local address) of every listening TCP socket the given processes hold."""
    import socket
    import struct

    addrs = {}
    for path, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(path).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A":  # LISTEN
                continue
            ip_hex, port = f[1].split(":")
            if v6:
                words = [struct.pack("<I", int(ip_hex[i : i + 8], 16)) for i in range(0, 32, 8)]
                ip = socket.inet_ntop(socket.AF_INET6, b"".join(words))
            else:
                ip = socket.inet_ntoa(struct.pack("<I", int(ip_hex, 16)))
            addrs[f[9]] = f"{ip}:{int(port, 16)}"
    out = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except (FileNotFoundError, PermissionError):
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except (FileNotFoundError, PermissionError):
                continue
            if link.startswith("socket:[") and link[8:-1] in addrs:
                out.append((pid, addrs[link[8:-1]]))
    return out


def greedy_completion(ids: list[int], n: int, **extra) -> dict:
    """A /v1/completions body for exactly `n` greedy tokens after token ids `ids`
    (min_tokens bans EOS the way HF's min_new_tokens does), special tokens kept."""
    return {
        "model": "tiny-llama",
        "prompt": ids,
        "max_tokens": n,
        "temperature": 0,
        "min_tokens": n,
        "skip_special_tokens": False,
        **extra,
    }


def dashboard_metrics() -> set[str]:
    """Every metric name a panel of deploy/grafana/pdcluster.json queries: pdcluster's
    (`pdcluster_...`) and vLLM's (`vllm:...`, a ':' in the name), as exposed
    (`_bucket`, `_sum`, `_count`, `_total` included)."""
    import json
    import re

    dash = json.loads((ROOT / "deploy" / "grafana" / "pdcluster.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", []) if t.get("expr")]
    name = r"(?<![\w:])(?:pdcluster_|vllm:)[a-zA-Z0-9_:]+"
    return {m for e in exprs for m in re.findall(name, e)}


def metric_above(url: str, name: str, floor: float, note=None, timeout_s: float = 10) -> None:
    """`metric` passes `floor` within `timeout_s`: a router replica's counters reach
    the others' /metrics with its next report (every health period)."""
    deadline = time.monotonic() + timeout_s
    while (value := metric(url, name)) <= floor:
        assert time.monotonic() < deadline, (name, value, floor, note)
        time.sleep(0.2)


def metric(url: str, name: str) -> float:
    """The sum of every sample of `name` (optionally `name{k="v",...}`) whose labels
    include the given ones: over router replicas, worker replicas and the rest."""
    import re

    from prometheus_client.parser import text_string_to_metric_families

    base, _, sel = name.partition("{")
    want = dict(re.findall(r'(\w+)="([^"]*)"', sel))
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == base and want.items() <= s.labels.items()
    )


def _netns_missing() -> str | None:
    """Why this machine cannot make network namespaces (chaos/testbed.py), or None."""
    from chaos import testbed

    probe = f"{testbed.PREFIX}probe{os.getpid()}"  # a killed run's probe never blocks the next
    try:
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, timeout=10)
    except FileNotFoundError:
        return "no iproute2 (`ip`)"
    if made.returncode:
        return f"`ip netns add` refused: {made.stderr.decode().strip()} (needs CAP_NET_ADMIN)"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


NETNS_MISSING = _netns_missing()
# The testbed's tests: skipped, saying why, where network namespaces cannot be made.
needs_netns = pytest.mark.skipif(NETNS_MISSING is not None, reason=NETNS_MISSING or "")
