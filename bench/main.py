"""`pdcluster bench URL`: throughput, latency and goodput of any OpenAI-compatible
endpoint, through the same load generator as `pdcluster chaos` (chaos/load.py).

One point per request rate (`--rates`, Poisson arrivals) or one closed-loop point
(`--concurrency`). At each point the endpoint gets `--duration` seconds of streaming
requests; then every request that started is waited for. Per point: request
throughput, output tokens/s, goodput (completed requests/s that met every SLO) and
TTFT, TPOT, ITL and end-to-end percentiles.

`--compare URL2` measures a second endpoint at every point, alternating which goes
first, so both see the same machine in the same state; the report gives the ratio of
the first to the second.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from chaos.load import Load, LoadShape, Record, percentile
from wire.host import cpu_model

QUANTILES = (50, 90, 99)
# Common English words, each one token (with its leading space) in the BPE vocabularies
# of Llama-family models; prompt lengths are judged by the endpoint's own usage counts.
WORDS = (
    "time year people way day man thing woman life child world school state family "
    "student group country problem hand part place case week company system program "
    "question work government number night point home water room mother area money "
    "story fact month lot right study book eye job word business issue side kind head "
    "house service friend father power hour game line end member law car city name"
).split()


@dataclass(frozen=True)
class Slo:
    """Targets a request must meet to count as good (seconds; None: not judged)."""

    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None

    @classmethod
    def parse(cls, text: str | None) -> Slo:
        """`ttft=0.5,tpot=0.1` (seconds; also `e2e`)."""
        if not text:
            return cls()
        kw = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in ("ttft", "tpot", "e2e"):
                raise ValueError(f"--slo: {part!r} is not ttft=S, tpot=S or e2e=S")
            kw[key] = float(value)
            if kw[key] <= 0:
                raise ValueError(f"--slo: {key} must be > 0")
        return cls(**kw)

    def met(self, r: Record) -> bool:
        checks = ((self.ttft, r.ttft), (self.tpot, tpot(r)), (self.e2e, r.latency))
        return all(target is None or (v is not None and v <= target) for target, v in checks)


def parse_range(text: str | int) -> tuple[int, int]:
    """`64` or `32-128` (inclusive, drawn uniformly)."""
    lo, _, hi = str(text).partition("-")
    a, b = int(lo), int(hi or lo)
    if not 1 <= a <= b:
        raise ValueError(f"{text!r} is not N or LOW-HIGH with 1 <= LOW <= HIGH")
    return a, b


def tpot(r: Record) -> float | None:
    """Mean time per output token after the first (None for fewer than 2 tokens)."""
    n = r.tokens or len(r.chunk_times)
    if r.first is None or n < 2 or not r.chunk_times:
        return None
    return (r.chunk_times[-1] - r.first) / (n - 1)


def _dist(values: list[float]) -> dict:
    out = {f"p{q}": percentile(values, q) for q in QUANTILES}
    out["mean"] = sum(values) / len(values) if values else None
    return out


def summarize(records: list[Record], wall_s: float, slo: Slo) -> dict:
    """One point's figures. Rates are over `wall_s`, from the first request sent to
    the last one's end."""
    done = [r for r in records if r.end is not None]
    ok = [r for r in done if r.completed]
    good = [r for r in ok if slo.met(r)]
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    return {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(done) - len(ok),
        "errors": sorted({r.error for r in done if r.error})[:5],
        "wall_s": wall_s,
        "request_throughput": len(ok) / wall_s if wall_s > 0 else 0.0,
        "output_tok_s": sum(r.tokens for r in ok) / wall_s if wall_s > 0 else 0.0,
        "goodput": len(good) / wall_s if wall_s > 0 else 0.0,
        "good": len(good),
        "prompt_tokens_mean": sum(r.prompt_tokens for r in ok) / len(ok) if ok else None,
        "ttft_s": _dist([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": _dist([t for r in ok if (t := tpot(r)) is not None]),
        "itl_s": _dist(itl),
        "e2e_s": _dist([r.latency for r in ok if r.latency is not None]),
    }


@dataclass(frozen=True)
class Workload:
    prompt_tokens: tuple[int, int]
    output_tokens: tuple[int, int]
    system_prompt_tokens: int = 0
    n_prompts: int = 256
    seed: int = 0

    def prompts(self) -> tuple[list[str], tuple[int, ...]]:
        """Prompt texts (the shared system prompt first) and max_tokens for each."""
        rng = random.Random(self.seed)
        system = " ".join(rng.choice(WORDS) for _ in range(self.system_prompt_tokens))
        prompts, lengths = [], []
        for i in range(self.n_prompts):
            n = rng.randint(*self.prompt_tokens)
            body = f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(n))
            prompts.append(f"{system}\n{body}" if system else body)
            lengths.append(rng.randint(*self.output_tokens))
        return prompts, tuple(lengths)


def _progress(label: str, load: Load, t0: float, duration: float) -> None:
    elapsed = time.time() - t0
    width = 30
    if load.shape.total:  # a request count: the bar counts requests ended
        filled = min(width, width * load.done // load.shape.total)
        where = f"{load.done}/{load.shape.total} requests"
    else:
        filled = min(width, int(width * elapsed / duration)) if duration else width
        where = f"{elapsed:5.1f}/{duration:.0f}s"
    sys.stderr.write(
        f"\r{label:28s} [{'#' * filled}{'.' * (width - filled)}] {where}"
        f"  {load.done} done, {load.failed} failed "
    )
    sys.stderr.flush()


def run_point(url: str, shape: LoadShape, duration_s: float, label: str) -> tuple[list, float]:
    """`duration_s` of load (or, with `shape.total`, until that many requests have
    ended), then every request sent is waited for. Returns the records and the wall
    time from the first request to the last end."""
    load = Load(url, shape).start()
    t0 = load.started_at

    def running() -> bool:
        return not load.finished if shape.total else time.time() - t0 < duration_s

    while running():
        _progress(label, load, t0, duration_s)
        time.sleep(0.2)
    records = load.stop()
    _progress(label, load, t0, duration_s)
    sys.stderr.write("\n")
    ends = [r.end for r in records if r.end is not None]
    return records, (max(ends) - t0) if ends else duration_s


def bench(
    urls: list[str],
    model: str,
    workload: Workload,
    slo: Slo,
    rates: list[float] | None,
    concurrency: int,
    duration_s: float,
    endpoint: str = "/v1/completions",
    warmup: int = 4,
    requests: int = 0,
    extras: list[dict] | None = None,
) -> dict:
    """Measure every target at every point; the report as a dict. Target i is urls[i]
    with extras[i] (fields added to every request body, e.g. logprobs or n), named by
    its URL, and by the fields too when two targets share a URL."""
    extras = extras or [{} for _ in urls]
    names = [
        f"{u} {json.dumps(x, separators=(',', ':'))}" if urls.count(u) > 1 and x else u
        for u, x in zip(urls, extras, strict=True)
    ]
    names = [n if names.index(n) == j else f"{n} #{j + 1}" for j, n in enumerate(names)]
    prompts, lengths = workload.prompts()
    base = LoadShape(
        prompts=prompts,
        max_tokens=max(lengths),
        model=model,
        concurrency=concurrency,
        endpoint=endpoint,
        lengths=lengths,
        seed=workload.seed,
    )
    for url, extra in zip(urls, extras):  # one request each first: nothing is cold
        warm = dataclasses.replace(
            base, concurrency=1, max_tokens=4, lengths=(), body={**base.body, **extra}
        )
        load = Load(url, warm).start()
        while load.done < warmup and time.time() - load.started_at < 120:
            time.sleep(0.1)
        load.stop()
    points = []
    for k, x in enumerate(rates or [None]):
        shape = LoadShape(**{**base.__dict__, "rate": x, "total": requests})
        order = list(enumerate(urls))
        if k % 2:
            order.reverse()  # alternate which target goes first
        results = {}
        for j, url in order:
            label = f"{'rate ' + format(x, 'g') if x else f'concurrency {concurrency}'} {names[j]}"
            target = dataclasses.replace(shape, body={**shape.body, **extras[j]})
            records, wall = run_point(url, target, duration_s, label[:28])
            results[names[j]] = summarize(records, wall, slo)
        results = {n: results[n] for n in names}  # in target order
        point = {"rate": x, "concurrency": concurrency, "results": results}
        if len(urls) == 2:
            a, b = (results[n] for n in names)
            point["ratio"] = {
                key: (a[key] / b[key] if b[key] else None)
                for key in ("output_tok_s", "goodput", "request_throughput")
            }
        points.append(point)
    return {
        "cpu": cpu_model(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "urls": names,
        "model": model,
        "endpoint": endpoint,
        "workload": asdict(workload),
        "slo": asdict(slo),
        "duration_s": duration_s,
        "requests": requests,
        "points": points,
    }


def table(report: dict) -> str:
    """The report as a Markdown table, one row per point and endpoint."""
    rows = [
        "| point | endpoint | req/s | out tok/s | goodput | TTFT p50/p99 (s) | TPOT p50/p99 (ms) "
        "| failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in report["points"]:
        where = f"rate {p['rate']:g}/s" if p["rate"] else f"{p['concurrency']} clients"
        for url, r in p["results"].items():
            t, o = r["ttft_s"], r["tpot_s"]
            ms = [f"{v * 1000:.0f}" if v is not None else "-" for v in (o["p50"], o["p99"])]
            s = [f"{v:.2f}" if v is not None else "-" for v in (t["p50"], t["p99"])]
            rows.append(
                f"| {where} | {url} | {r['request_throughput']:.2f} | {r['output_tok_s']:.1f} "
                f"| {r['goodput']:.2f} | {s[0]} / {s[1]} | {ms[0]} / {ms[1]} | {r['failed']} |"
            )
        if p.get("ratio"):
            ratio = ", ".join(f"{k} {v:.2f}x" for k, v in p["ratio"].items() if v is not None)
            rows.append(f"| {where} | first / second | {ratio} | | | | | |")
    return "\n".join(rows)


def plot(report: dict, out: Path) -> list[Path]:
    """goodput.png (goodput and throughput against the point) and latency.png
    (TTFT and TPOT p50/p99), every endpoint on the same axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_rate = any(p["rate"] for p in report["points"])
    xs = [p["rate"] if by_rate else p["concurrency"] for p in report["points"]]
    xlabel = "request rate (req/s, Poisson)" if by_rate else "concurrent clients"
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for url in report["urls"]:
        res = [p["results"][url] for p in report["points"]]
        ax.plot(xs, [r["goodput"] for r in res], "o-", label=f"goodput {url}")
        ax.plot(xs, [r["request_throughput"] for r in res], "x--", label=f"throughput {url}")
    ax.set(xlabel=xlabel, ylabel="requests/s", title=f"goodput, SLO {report['slo']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "goodput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, unit in ((axes[0], "ttft_s", "TTFT (s)"), (axes[1], "tpot_s", "TPOT (s)")):
        for url in report["urls"]:
            res = [p["results"][url][key] for p in report["points"]]
            for q, style in (("p50", "o-"), ("p99", "x--")):
                ax.plot(xs, [r[q] for r in res], style, label=f"{q} {url}")
        ax.set(xlabel=xlabel, ylabel=unit)
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "latency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def bench_main(args) -> int:
    """`pdcluster bench` (pdcluster/cli.py parses the arguments)."""
    try:
        slo = Slo.parse(args.slo)
        workload = Workload(
            prompt_tokens=parse_range(args.prompt_tokens),
            output_tokens=parse_range(args.max_tokens),
            system_prompt_tokens=args.system_prompt_tokens,
            seed=args.seed,
        )
        rates = [float(r) for r in args.rates.split(",")] if args.rates else None
        if rates and any(r <= 0 for r in rates):
            raise ValueError("--rates must be > 0")
        if args.requests < 0:
            raise ValueError("--requests must be >= 0")
        if args.compare and args.compare_extra is not None:
            raise ValueError("--compare and --compare-extra each name the second target")
    except ValueError as e:
        print(f"pdcluster bench: {e}", file=sys.stderr)
        return 2
    urls = [args.url.rstrip("/")] + ([args.compare.rstrip("/")] if args.compare else [])
    extras = [args.extra]
    if args.compare_extra is not None:  # the same endpoint again, with other fields
        urls.append(urls[0])
        extras.append(args.compare_extra)
    elif args.compare:
        extras.append(args.extra)
    endpoint = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    report = bench(
        urls,
        args.model,
        workload,
        slo,
        rates,
        args.concurrency,
        args.duration,
        endpoint,
        requests=args.requests,
        extras=extras,
    )
    report["command"] = " ".join(["pdcluster", "bench", *sys.argv[2:]])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    plot(report, out)
    print(table(report))
    print(f"wrote {out / 'bench.json'}, {out / 'goodput.png'}, {out / 'latency.png'}")
    failed = sum(r["failed"] for p in report["points"] for r in p["results"].values())
    return 1 if failed and args.fail_on_error else 0
