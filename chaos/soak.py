"""`pdcluster chaos --soak SECONDS`: steady load for a long time with a fault from
the mixed pool every `chaos.soak.fault_every_s`, sampling every process's RSS and
open file descriptors and every table (leases, transfers, requests, streams,
channels) every `chaos.soak.sample_s`. A share of the requests
(`chaos.soak.rejected_share`) send a prompt over the context, which must get a 400.
It fails when a table passes its bound, when any process's RSS grows faster than
`max_rss_growth_mb_per_10k` per 10,000 requests after warm-up, when fds grow by more
than `max_fds_growth`, or when a request hangs, is not refused as expected or its text
differs from the fault-free pass (seed failures 1 and 4: tables and memory that
only grow)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import threading
import time
from collections import Counter, defaultdict

import ray

from chaos.harness import Harness
from chaos.load import Load, over_long_prompt
from chaos.scenarios import MIXED_POOL, SCENARIOS, Skip
from chaos.target import ZERO_KEYS, HealthMonitor, Target
from wire.host import cpu_model, process_usage


def _proxies() -> dict[str, tuple]:
    """Serve's HTTP proxies (cluster/edge.py runs in them): pid, RSS and fds of each.
    Asked through Ray's `__ray_call__`, which runs a function in the actor's process."""
    names = sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].startswith("SERVE_PROXY_ACTOR")
    )
    out = {}
    for i, name in enumerate(names):
        try:
            proxy = ray.get_actor(name, namespace="serve")
            # A lambda travels by value; process_usage by reference (wire.host is light).
            u = ray.get(proxy.__ray_call__.remote(lambda _: process_usage()), timeout=5)
        except Exception:  # noqa: BLE001 - restarting: no sample this time
            continue
        name = "proxy" if len(names) == 1 else f"proxy-{i}"
        out[name] = (u["pid"], u["rss_bytes"], u["open_fds"])
    return out


def _sample(target: Target, load: Load) -> dict | None:
    try:
        s = target.state()
    except Exception:  # noqa: BLE001 - router restarting: no sample this time
        return None
    # Every router replica (router.replicas), by its Serve replica id.
    procs = {
        f"router-{r['router_id']}": (r["router_pid"], r["router_rss_bytes"], r["router_open_fds"])
        for r in s["routers"]
    }
    for w in s["workers"]:
        st = w["stats"]
        if st:
            procs[f"{w['role']}-{w['replica']}"] = (st["pid"], st["rss_bytes"], st["open_fds"])
    procs.update(_proxies())
    channels = [
        w["stats"]["channels"] for w in s["workers"] if w["stats"] and w["role"] == "decode"
    ]
    return {
        "t": time.time(),
        "requests": load.done,
        "procs": procs,
        "tables": {
            **{k: s[k] for k in ("requests_in_flight", "prefill_leases", "transfer_pending")},
            "decode_streams": s["decode_streams"],
            "router_channel_queues": s["router_channel_queues"],
            "decode_channels_max": max(channels, default=0),
        },
    }


def _bounds(cfg) -> dict:
    """What each table may hold under this load. Every per-request table is bounded by
    the clients (one request each) with room for entries on their way out; a table
    that leaks passes it within minutes. The config's own limits (max_queued,
    max_pending) are far above and would only be reached by a leak much later."""
    c = 2 * cfg.chaos.concurrency
    return {
        "requests_in_flight": c,
        # Leases of attempts that failed (injected faults) wait out lease_ttl_s.
        "prefill_leases": 2 * c,
        "transfer_pending": c,
        "decode_streams": c,
        "router_channel_queues": c,
        # Two per router replica while one replaces the other (router.channel_max_messages),
        # and one more while a router is replaced.
        "decode_channels_max": 2 * cfg.router.replicas + 1,
    }


def _slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x; None with too few points or no spread in x."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    vx = sum((x - mx) ** 2 for x, _ in points)
    if vx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / vx


def soak(target: Target, duration: float, out_dir: str, *, seed: int = 0, progress=print):
    os.makedirs(out_dir, exist_ok=True)
    cfg, sk = target.cfg, target.cfg.chaos.soak
    h = Harness(target, seed=seed, progress=progress)
    rng = random.Random(f"{seed}:soak")
    samples, faults, fault_errors = [], [], []
    shape = dataclasses.replace(
        h.shape,
        stream=sk.stream,
        rejected_share=sk.rejected_share,
        rejected_prompt=over_long_prompt(cfg.model.max_model_len, seed),
    )
    with HealthMonitor(target):
        h.run_baseline()  # streamed, nothing refused: the texts are the same either way
        load = Load(target.url, shape).start()
        t0 = time.time()
        next_fault = t0 + sk.fault_every_s
        running: threading.Thread | None = None
        while time.time() - t0 < duration:
            time.sleep(sk.sample_s)
            s = _sample(target, load)
            if s:
                samples.append(s)
            now = time.time()
            if (
                sk.fault_every_s
                and now >= next_fault
                and (running is None or not running.is_alive())
            ):
                sc = SCENARIOS[rng.choice(MIXED_POOL)]
                target.forget()

                def apply(sc=sc):
                    try:
                        w = sc.fault(target, sc, rng)
                        faults.append({"name": sc.name, "start": w.start, "end": w.end})
                    except Skip:
                        pass
                    except Exception as e:  # noqa: BLE001 - reported
                        fault_errors.append(f"{sc.name}: {e!r}")

                running = threading.Thread(target=apply, daemon=True)
                running.start()
                next_fault = now + sk.fault_every_s
            progress(
                f"[soak] {now - t0:6.0f}s  done {load.done}  failed {load.failed}  "
                f"faults {len(faults)}"
            )
        if running is not None:
            running.join(120)
        records = load.stop()
        ok, state, why = target.wait_settled(cfg.chaos.settle_s)
    texts = h.baseline.texts
    outcome, errors = Counter(), Counter()
    for r in records:
        if r.hung:
            kind = "hung"
        elif r.rejected:
            kind = "rejected" if r.refused else "failed"
        elif r.completed:
            kind = "ok" if r.text == texts[r.prompt] and r.valid is not False else "corrupted"
        else:
            kind = "failed"
        outcome[kind] += 1
        if kind in ("hung", "failed"):
            why = r.error or ("over-long prompt served" if r.completed else "unknown")
            errors[why] += 1
    failures = [f"fault could not be applied: {e}" for e in fault_errors]
    bounds = _bounds(cfg)
    peaks = {k: max((s["tables"][k] for s in samples), default=0) for k in bounds}
    for k, bound in bounds.items():
        if peaks[k] > bound:
            failures.append(f"{k} reached {peaks[k]} > bound {bound}")
    growth = _growth(samples, sk.warmup_requests)
    for name, g in growth.items():
        if g["rss_mb_per_10k"] is not None and g["rss_mb_per_10k"] > sk.max_rss_growth_mb_per_10k:
            failures.append(
                f"{name} RSS grows {g['rss_mb_per_10k']:.1f} MB per 10k requests "
                f"> {sk.max_rss_growth_mb_per_10k}"
            )
        if g["fds_growth"] > sk.max_fds_growth:
            failures.append(f"{name} open fds grew by {g['fds_growth']} > {sk.max_fds_growth}")
    if outcome["hung"]:
        failures.append(f"{outcome['hung']} hung")
    if outcome["corrupted"]:
        failures.append(f"{outcome['corrupted']} corrupted")
    leaked = {k: state[k] for k in ZERO_KEYS if state and state[k]}
    if not ok:
        failures.append(f"did not settle: {why}")
    rep = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": cpu_model(),
        "model": cfg.served_model_name,
        "duration_s": duration,
        "stream": sk.stream,
        "rejected_share": sk.rejected_share,
        "warmup_requests": sk.warmup_requests,
        "max_rss_growth_mb_per_10k": sk.max_rss_growth_mb_per_10k,
        "requests": dict(outcome),
        "errors": dict(errors.most_common(10)),
        "faults": faults,
        "peaks": peaks,
        "bounds": bounds,
        "growth": growth,
        "leaked": leaked,
        "failures": failures,
        "passed": not failures,
        "plot": "soak.png",
    }
    with open(os.path.join(out_dir, "soak.json"), "w") as f:
        json.dump({**rep, "samples": samples}, f)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(_markdown(rep))
    _plot(samples, faults, os.path.join(out_dir, "soak.png"))
    progress(
        f"[soak] {'PASS' if not failures else 'FAIL'}: {dict(outcome)}; " + "; ".join(failures)
    )
    return not failures, rep


def _growth(samples: list[dict], warmup_requests: int = 0) -> dict:
    """Per process (one series per pid: a restart starts a new one), RSS slope against
    requests done, after warm-up (allocator, caches): `warmup_requests` requests, or the
    first quarter of the run when that is 0."""
    series = defaultdict(list)
    after = (
        [s for s in samples if s["requests"] >= warmup_requests]
        if warmup_requests
        else samples[len(samples) // 4 :]
    )
    for s in after:
        for name, (pid, rss, fds) in s["procs"].items():
            series[(name, pid)].append((s["requests"], rss / 2**20, fds))
    out = {}
    for (name, pid), pts in series.items():
        slope = _slope([(n, mb) for n, mb, _ in pts])
        key = f"{name} (pid {pid})"
        out[key] = {
            "samples": len(pts),
            "requests": pts[-1][0] - pts[0][0],
            "rss_mb_first": round(pts[0][1], 1),
            "rss_mb_last": round(pts[-1][1], 1),
            "rss_mb_per_10k": None
            if slope is None or pts[-1][0] - pts[0][0] < 1000
            else round(slope * 10_000, 2),
            "fds_growth": pts[-1][2] - pts[0][2],
        }
    return out


def _markdown(rep: dict) -> str:
    lines = [
        f"# Chaos soak: {'PASS' if rep['passed'] else 'FAIL'}",
        "",
        f"{rep['model']}, {rep['duration_s']:.0f} s, {rep['cpu']}, {rep['created']}.",
        f"Requests ({'streamed' if rep['stream'] else 'not streamed'}; "
        f"{rep['rejected_share']:.0%} with a prompt over the context, to be refused): "
        f"{rep['requests']}; faults applied: {len(rep['faults'])} "
        f"({', '.join(sorted({f['name'] for f in rep['faults']}))}).",
        *(
            [f"Failed requests: {'; '.join(f'{n} x `{m}`' for m, n in rep['errors'].items())}."]
            if rep["errors"]
            else []
        ),
        "",
        "| table | peak | bound |",
        "|---|---|---|",
        *[f"| {k} | {rep['peaks'][k]} | {b} |" for k, b in rep["bounds"].items()],
        "",
        "RSS growth after "
        + (
            f"{rep['warmup_requests']} requests of warm-up"
            if rep["warmup_requests"]
            else "the first quarter (warm-up)"
        )
        + f"; bound {rep['max_rss_growth_mb_per_10k']} MB per 10k requests.",
        "",
        "| process | cluster requests meanwhile | RSS MB first -> last | MB per 10k requests "
        "| fds growth |",
        "|---|---|---|---|---|",
        *[
            f"| {k} | {g['requests']} | {g['rss_mb_first']} -> {g['rss_mb_last']} "
            f"| {g['rss_mb_per_10k'] if g['rss_mb_per_10k'] is not None else '-'} "
            f"| {g['fds_growth']} |"
            for k, g in rep["growth"].items()
        ],
        *([] if rep["growth"] else ["", "No process was sampled past the warm-up."]),
        "",
        f"Leaked after the load: {rep['leaked'] or 'nothing'}.",
    ]
    if rep["failures"]:
        lines += ["", "Missed: " + "; ".join(rep["failures"])]
    lines += ["", "![soak](soak.png)"]
    return "\n".join(lines) + "\n"


def _plot(samples: list[dict], faults: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not samples:
        return
    t0 = samples[0]["t"]
    xs = [(s["t"] - t0) / 60 for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(9, 7.5), dpi=100, sharex=True)
    names = sorted({n for s in samples for n in s["procs"]})
    for name in names:
        pts = [(x, s["procs"][name][1] / 2**20) for x, s in zip(xs, samples) if name in s["procs"]]
        axes[0].plot(*zip(*pts), lw=1.2, label=name)
    axes[0].set_ylabel("RSS (MB)")
    axes[0].legend(fontsize=7, ncol=3)
    for key in samples[0]["tables"]:
        axes[1].plot(xs, [s["tables"][key] for s in samples], lw=1.2, label=key)
    axes[1].set_ylabel("table entries")
    axes[1].legend(fontsize=7, ncol=3)
    for name in names:
        pts = [(x, s["procs"][name][2]) for x, s in zip(xs, samples) if name in s["procs"]]
        axes[2].plot(*zip(*pts), lw=1.2, label=name)
    axes[2].set_ylabel("open fds")
    ax2 = axes[2].twinx()
    ax2.plot(xs, [s["requests"] for s in samples], color="black", ls=":", lw=1)
    ax2.set_ylabel("requests done (dotted)")
    axes[2].set_xlabel("minutes")
    for f in faults:
        for ax in axes:
            ax.axvline((f["start"] - t0) / 60, color="#e06666", lw=0.8, alpha=0.6)
    axes[0].set_title("soak: red lines are faults", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
