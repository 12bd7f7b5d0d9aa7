"""Which GEMM path the model's linear layers take on this CPU, chosen by measuring.

Candidates: `linear` (`F.linear`, torch's default), `mkl_packed` (weights repacked
once into MKL's packed layout, where torch has MKL) and `onednn` (weights reordered
for oneDNN's `_linear_pointwise`, where torch has it). A candidate that is missing or
gives a different answer than `F.linear` is dropped. For each distinct weight shape
and each row bucket (1 row: decode at batch 1; 2-127: decode batches; 128+: prefill),
the fastest candidate on this machine, at the model thread's thread count, wins.

Nothing is chosen by CPU vendor: a path that is fast on one CPU measured slower on
another (MKL-packed GEMMs won on an Intel machine and lost on an AMD EPYC). The choice
is cached per CPU model, torch version, thread count, dtype and device in the model
cache directory, so a worker's start-up measures once per machine type; workers on one
node take turns (a file lock), so they neither measure at once nor measure twice.
`PDCLUSTER_GEMM=linear` (or another path) pins every layer to one path instead.

Each weight gets at most one layout besides its own: the alternative path that saves
the most time over the three buckets, used in the buckets where it beats `F.linear`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from wire.host import cpu_model

log = logging.getLogger("pdcluster.gemm")

# Row bucket -> the row counts measured for it (summed).
BUCKETS = {"1": (1,), "2-127": (8, 32), "128+": (256,)}
VERSION = 1  # of the plan format and buckets, part of the cache key


def bucket(rows: int) -> int:
    return 0 if rows == 1 else 1 if rows < 128 else 2


def prepare(path: str, w: torch.Tensor) -> torch.Tensor | None:
    """The weight laid out for `path` (None for `linear`, which uses `w` as is)."""
    if path == "mkl_packed":
        return torch.ops.mkl._mkl_reorder_linear_weight(w, 32)
    if path == "onednn":
        return torch.ops.mkldnn._reorder_linear_weight(w)
    return None


def run(path: str, x: torch.Tensor, w: torch.Tensor, prepared: torch.Tensor | None):
    if path == "mkl_packed":
        return torch.ops.mkl._mkl_linear(x, prepared, w, None, x.numel() // x.shape[-1])
    if path == "onednn":
        return torch.ops.mkldnn._linear_pointwise(x, prepared, None, "none", [], "")
    return F.linear(x, w)


def candidates(w: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """The paths that exist here for `w` and agree with `F.linear`, prepared."""
    out: dict[str, torch.Tensor | None] = {"linear": None}
    if w.device.type != "cpu" or w.dtype != torch.float32:
        return out
    x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(0))
    want = F.linear(x, w)
    for path, present in (
        ("mkl_packed", torch._C.has_mkl),
        ("onednn", torch.backends.mkldnn.is_available()),
    ):
        if not present:
            continue
        try:
            prepared = prepare(path, w)
            if torch.allclose(run(path, x, w, prepared), want, rtol=1e-4, atol=1e-4):
                out[path] = prepared
        except Exception as e:  # noqa: BLE001 - not in this torch build: not a candidate
            log.info("GEMM path %s unavailable: %r", path, e)
    return out


def _time(fn, budget_s: float = 0.05) -> float:
    """Median seconds of `fn()` over at least 3 runs, about `budget_s` in all."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget_s and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def measure(w: torch.Tensor) -> dict[str, dict[str, float]]:
    """bucket -> path -> seconds (summed over the bucket's row counts) for weight `w`."""
    paths = candidates(w)
    g = torch.Generator().manual_seed(1)
    out: dict[str, dict[str, float]] = {}
    for name, rows in BUCKETS.items():
        xs = [torch.randn(r, w.shape[1], generator=g, dtype=w.dtype) for r in rows]
        out[name] = {
            path: sum(_time(lambda x=x, p=path, pr=prep: run(p, x, w, pr)) for x in xs)
            for path, prep in paths.items()
        }
    return out


def shape_key(w: torch.Tensor) -> str:
    return f"{w.shape[0]}x{w.shape[1]}"


def plan_key(w: torch.Tensor) -> str:
    return (
        f"v{VERSION} | {cpu_model()} | torch {torch.__version__} | "
        f"{torch.get_num_threads()} threads | {w.dtype} on {w.device.type}"
    )


def route_for(secs: dict[str, dict[str, float]]) -> list[str]:
    """Per bucket: `linear`, or the one alternative that saves the most time overall
    where it is faster than `linear` (one extra copy of the weight at most)."""

    def saved(alt: str) -> float:
        return sum(max(0.0, v["linear"] - v[alt]) for v in secs.values())

    alts = {p for v in secs.values() for p in v if p != "linear"}
    best = max(sorted(alts), key=saved, default=None)
    return [best if best is not None and v[best] < v["linear"] else "linear" for v in secs.values()]


def choose(weights: list[torch.Tensor], cache_file: Path | None) -> dict[str, list[str]]:
    """weight shape -> the fastest path per row bucket, read from `cache_file` when this
    machine type has measured those shapes before, else measured (and stored)."""
    pinned = os.environ.get("PDCLUSTER_GEMM")
    if pinned:
        return {shape_key(w): [pinned] * len(BUCKETS) for w in weights}
    if not weights or weights[0].device.type != "cpu" or weights[0].dtype != torch.float32:
        return {shape_key(w): ["linear"] * len(BUCKETS) for w in weights}  # nothing to pick
    key = plan_key(weights[0])
    if cache_file is None:
        return _measure_missing(weights, {}, key)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_file.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one worker of this node measures at a time
        try:
            cached = json.loads(cache_file.read_text()).get(key, {})
        except (OSError, ValueError, AttributeError):
            cached = {}
        plan = _measure_missing(weights, cached, key)
        if set(plan) - set(cached):
            _store(cache_file, key, plan)
    return {shape_key(w): plan[shape_key(w)] for w in weights}


def _measure_missing(weights: list[torch.Tensor], cached: dict, key: str) -> dict:
    plan = dict(cached)
    for w in weights:
        shape = shape_key(w)
        if shape in plan:
            continue
        t0 = time.perf_counter()
        secs = measure(w)
        plan[shape] = route_for(secs)
        log.info(
            "GEMM %s (%s): %s in %.2fs; us per bucket %s",
            shape,
            key,
            plan[shape],
            time.perf_counter() - t0,
            {b: {p: round(t * 1e6) for p, t in v.items()} for b, v in secs.items()},
        )
    return plan


def _store(cache_file: Path, key: str, plan: dict) -> None:
    """Merge into the cache file atomically (other workers on the node share it)."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            data = {}
        data[key] = {**data.get(key, {}), **plan}
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=".gemm-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, cache_file)
    except OSError as e:  # a read-only cache: measured again next start
        log.warning("could not store GEMM plans in %s: %r", cache_file, e)
