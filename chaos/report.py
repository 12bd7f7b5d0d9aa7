"""The chaos report: report.json (one object per scenario), report.md (a table a
person reads) and one PNG timeline per scenario."""

from __future__ import annotations

import dataclasses
import json
import os
import time

from chaos.load import percentile


def _row(r) -> dict:
    d = {k: v for k, v in dataclasses.asdict(r).items() if k != "records"}
    d["passed"] = r.passed
    d["success_rate"] = round(r.success_rate, 4)
    return d


def write(out_dir: str, cfg, baseline, results, seed: int) -> dict:
    from wire.host import cpu_model

    rep = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": cpu_model(),
        "model": cfg.served_model_name,
        "replicas": {"prefill": cfg.prefill.replicas, "decode": cfg.decode.replicas},
        "load": {
            "concurrency": cfg.chaos.concurrency,
            "max_tokens": cfg.chaos.max_tokens,
            "prompts": cfg.chaos.prompts,
        },
        "seed": seed,
        "baseline": {
            "goodput_rps": round(baseline.goodput, 3),
            "requests": baseline.requests,
            "nondeterministic": baseline.nondeterministic,
        },
        "passed": all(r.passed for r in results),
        "scenarios": [_row(r) for r in results],
    }
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(rep, f, indent=1)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown(rep))
    return rep


def _f(v, fmt="{:.1f}", none="-") -> str:
    return none if v is None else fmt.format(v)


def markdown(rep: dict) -> str:
    b = rep["baseline"]
    lines = [
        f"# Chaos report: {'PASS' if rep['passed'] else 'FAIL'}",
        "",
        f"{rep['model']}, {rep['replicas']['prefill']} prefill + {rep['replicas']['decode']} "
        f"decode replicas, {rep['load']['concurrency']} streaming clients x "
        f"{rep['load']['max_tokens']} tokens (greedy); {rep['cpu']}; {rep['created']}.",
        f"Baseline: {b['goodput_rps']} req/s over {b['requests']} fault-free requests.",
        "",
        "| scenario | sent | ok | failed | hung | corrupt | success | detect | recover "
        "| all healthy | p50 / p99 latency | goodput kept | leaked | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in rep["scenarios"]:
        if s["skipped"]:
            lines.append(f"| {s['name']} | | | | | | | | | | | | | skipped: {s['skipped']} |")
            continue
        leaked = sum(s["leaked"].values()) if s["leaked"] else 0
        failed = f"{s['failed']} ({s['excused']} in flight)" if s.get("excused") else s["failed"]
        lines.append(
            f"| {s['name']} | {s['sent']} | {s['succeeded']} | {failed} | {s['hung']} "
            f"| {s['corrupted']} | {s['success_rate']:.1%} | {_f(s['detect_s'], '{:.1f}s')} "
            f"| {_f(s['recover_s'], '{:.1f}s')} | {_f(s['healthy_again_s'], '{:.1f}s')} "
            f"| {_f(s['latency_p50_s'], '{:.2f}')} / "
            f"{_f(s['latency_p99_s'], '{:.2f}')} s | {_f(s['goodput_kept'], '{:.0%}')} "
            f"| {leaked} | {'pass' if s['passed'] else 'FAIL'} |"
        )
    lines += ["", "## Details", ""]
    for s in rep["scenarios"]:
        if s["skipped"]:
            continue
        lines.append(f"- **{s['name']}** ({s['about']}): {s['target']}.")
        if s["pre_fault_goodput"] is not None:
            lines.append(
                f"  Goodput before the fault: {s['pre_fault_goodput']} req/s; recovery "
                f"reference {s['reference_goodput']} req/s."
            )
        if s.get("lost"):
            lost = ", ".join(f"{n} {role}" for role, n in s["lost"].items())
            by = ", ".join(f"{k} {v:.1%}" for k, v in s["head_cpu_by"].items() if v >= 0.001)
            lines.append(
                f"  Lost for good: {lost}. Survivors' goodput {_f(s['goodput_after'], '{:.2f}')} "
                f"req/s; the head's Ray processes afterwards, idle: "
                f"{_f(s['head_cpu'], '{:.1%}')} of a core ({by})."
            )
        if s.get("views_agree_s") is not None:
            fenced = (
                f"the {s['fenced']} processes of the node from before the fault gone; "
                if s.get("fenced")
                else ""
            )
            lines.append(
                f"  Testbed: {fenced}Ray's, the router's and the workers' views of who is "
                f"alive agreed {s['views_agree_s']:.1f}s after the fault ended."
            )
        if s["errors"]:
            errs = "; ".join(f"{n} x `{m}`" for m, n in s["errors"].items())
            lines.append(f"  Failed requests: {errs}.")
        if s["failures"]:
            lines.append(f"  Missed: {'; '.join(s['failures'])}.")
        before, after = s["rss_mb_before"], s["rss_mb_after"]
        rss = ", ".join(f"{k} {before[k]}->{after.get(k, '?')}" for k in before)
        if rss:
            lines.append(f"  RSS MB: {rss}.")
        if s["timeline"]:
            lines.append(f"  ![{s['name']}]({s['timeline']})")
    return "\n".join(lines) + "\n"


def timeline(res, baseline, out_dir: str) -> str:
    """Completed requests per second and p99 latency over time; the fault window
    shaded; failed and corrupted requests marked where they ended."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = res.load_start
    recs = [r for r in res.records if r.end is not None]
    span = int(max(r.end for r in recs) - t0) + 1 if recs else 1
    texts = baseline.texts
    ok_per_s = [0] * span
    lat_by_s: list[list[float]] = [[] for _ in range(span)]
    bad, corrupt = [], []
    for r in recs:
        k = min(span - 1, int(r.end - t0))
        if r.completed and r.text == texts[r.prompt]:
            ok_per_s[k] += 1
            lat_by_s[k].append(r.latency)
        elif r.completed:
            corrupt.append(r.end - t0)
        else:
            bad.append(r.end - t0)
    fig, (ax, hx) = plt.subplots(
        2, 1, figsize=(9, 4.6), dpi=100, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    xs = list(range(span))
    ax.bar(xs, ok_per_s, width=1.0, align="edge", color="#4c8bd6", label="completed / s")
    ax.axhline(baseline.goodput, color="#4c8bd6", ls=":", lw=1, label="baseline")
    ax.set_ylabel("completed requests / s")
    if res.health:
        ts = [h[0] - t0 for h in res.health]
        hx.step(ts, [h[1] for h in res.health], where="post", color="#6aa84f", label="prefill")
        hx.step(ts, [h[2] for h in res.health], where="post", color="#8e7cc3", label="decode")
        hx.legend(loc="lower left", fontsize=7, ncol=2)
    hx.set_ylabel("healthy", fontsize=8)
    hx.set_ylim(-1.2, max([2] + [max(h[1], h[2]) for h in res.health]) + 0.5)
    hx.set_xlabel("seconds since load start (healthy -1: /health did not answer)")
    ax.axvspan(
        res.fault_start - t0,
        max(res.fault_end - t0, res.fault_start - t0 + 0.3),
        color="#e06666",
        alpha=0.25,
        label="fault",
    )
    if res.detect_s is not None:
        ax.axvline(
            res.fault_start - t0 + res.detect_s, color="#cc0000", ls="--", lw=1, label="detected"
        )
    if res.recovered_at is not None:
        ax.axvline(res.recovered_at - t0, color="#38761d", ls="--", lw=1, label="recovered")
    if bad:
        ax.plot(bad, [0] * len(bad), "x", color="#cc0000", ms=7, label="failed")
    if corrupt:
        ax.plot(corrupt, [0] * len(corrupt), "D", color="#9900ff", ms=6, label="corrupted")
    ax2 = ax.twinx()
    p99 = [percentile(v, 99) if v else float("nan") for v in lat_by_s]
    ax2.plot([x + 0.5 for x in xs], p99, color="#e69138", lw=1.5, label="p99 latency")
    ax2.set_ylabel("p99 latency (s)")
    ax2.set_ylim(bottom=0)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=7, ncol=4)
    ax.set_title(f"{res.name}: {res.target}", fontsize=9)
    fig.tight_layout()
    name = f"{res.name}.png"
    fig.savefig(os.path.join(out_dir, name))
    plt.close(fig)
    return name
