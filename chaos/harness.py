"""Run chaos scenarios against a cluster under steady load and judge them.

For each scenario: load starts, the fault is applied after `chaos.warmup_s`, the
load runs until goodput has recovered (or the recovery bound has passed), then
stops; the harness waits for `/health` to be ok with every replica healthy and for
`/debug/state` to be all zero, and reads what is left. Every request's text is
checked against the fault-free pass made first.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import msgspec

from chaos.config import ChaosRunConfig, Thresholds
from chaos.load import Load, LoadShape, Record, make_prompts, percentile
from chaos.scenarios import SCENARIOS, Scenario, Skip, Window
from chaos.target import ZERO_KEYS, HealthMonitor, Target

WINDOW_S = 3.0  # goodput is judged over windows this long, sliding by 0.5 s
RAMP_S = 1.0  # the load's first second (clients starting) is not part of the reference
RECOVERED = 0.9  # of baseline goodput
IN_FLIGHT_GRACE_S = 1.0  # a request sent this soon after a fault ended counts as in flight at it
HUNG_MARGIN_S = 10.0  # past router.request_timeout_s, a request with no end is hung


@dataclass
class Baseline:
    texts: dict[int, str]  # prompt index -> fault-free text
    goodput: float  # completed requests per second
    requests: int
    nondeterministic: int  # completed twice with different texts, no fault applied


@dataclass
class Result:
    name: str
    about: str
    skipped: str | None = None
    target: str = ""
    fault_start: float = 0.0
    fault_end: float = 0.0
    sent: int = 0
    succeeded: int = 0
    failed: int = 0
    hung: int = 0
    corrupted: int = 0
    failed_in_flight: int = 0  # of `failed`: in flight at the fault (see excuse_in_flight)
    excused: int = 0  # failures the success rate leaves out (excuse_in_flight)
    errors: dict = field(default_factory=dict)  # message -> count
    detect_s: float | None = None
    recover_s: float | None = None
    recovered_at: float | None = None  # time.time() of the recovery window's start
    healthy_again_s: float | None = None  # fault to every replica healthy on /health again
    latency_p50_s: float | None = None
    latency_p99_s: float | None = None
    ttft_p99_s: float | None = None
    pre_fault_goodput: float | None = None  # req/s from RAMP_S after load start to the fault
    reference_goodput: float | None = None  # recovery's: min(pre-fault, baseline)
    goodput_kept: float | None = None
    # Replicas lost for good (lose-node): role -> count; the survivors' goodput from the
    # recovery to the end of the load; the head's Ray processes afterwards, idle, in cores.
    lost: dict = field(default_factory=dict)
    goodput_after: float | None = None
    head_cpu: float | None = None
    head_cpu_by: dict = field(default_factory=dict)
    leaked: dict = field(default_factory=dict)
    # Testbed: processes from before the fault still running once settled (must be none),
    # and the time from the fault's end until Ray's, the router's and the workers' views
    # of who is alive agreed.
    fenced: int = 0  # processes the fault fenced off (Window.fenced)
    stale: list = field(default_factory=list)
    views_agree_s: float | None = None
    settled: bool = True
    unsettled_reason: str = ""
    rss_mb_before: dict = field(default_factory=dict)
    rss_mb_after: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)  # thresholds missed
    load_start: float = 0.0
    load_end: float = 0.0
    timeline: str = ""  # PNG file name
    # /health over the load: [time, prefill healthy, decode healthy] (-1: no answer)
    health: list = field(default_factory=list)
    records: list = field(default_factory=list, repr=False)  # not in report.json

    @property
    def passed(self) -> bool:
        return self.skipped is not None or not self.failures

    @property
    def success_rate(self) -> float:
        judged = self.sent - self.excused
        return self.succeeded / judged if judged else 0.0


def thresholds_for(cfg: ChaosRunConfig, name: str) -> Thresholds:
    over = cfg.chaos.scenarios.get(name, {})
    t = cfg.chaos.thresholds
    return msgspec.structs.replace(t, **{k: type(getattr(t, k))(v) for k, v in over.items()})


def rss_mb(state: dict | None) -> dict:
    if not state:
        return {}
    out = {"router": round(state.get("router_rss_bytes", 0) / 2**20, 1)}
    for w in state["workers"]:
        if w["stats"]:
            out[f"{w['role']}-{w['replica']}"] = round(w["stats"]["rss_bytes"] / 2**20, 1)
    return out


class Harness:
    def __init__(self, target: Target, *, seed: int = 0, min_duration: float = 0.0, progress=print):
        self.t, self.cfg, self.seed, self.say = target, target.cfg, seed, progress
        self.min_duration = min_duration  # each scenario's load runs at least this long
        c = self.cfg.chaos
        self.shape = LoadShape(
            prompts=make_prompts(c.prompts, seed),
            max_tokens=c.max_tokens,
            model=self.cfg.served_model_name,
            concurrency=c.concurrency,
            hung_after_s=self.cfg.router.request_timeout_s + HUNG_MARGIN_S,
            seed=seed,
            # Half the prompts sampled with a seed, and with the penalties and min_p, whose
            # state both tiers compute from the sequence's tokens: corruption is checked
            # for both kinds, across every fault's migrations and re-prefills. They ask for
            # logprobs too (token 1's cross the transfer; not compared, only carried).
            # A quarter of the prompts ask for a JSON schema, an eighth force a tool call:
            # every answer must validate, across every fault's migrations.
            formats=True,
            seeded={
                "logprobs": 2,
                "temperature": 0.8,
                "top_p": 0.95,
                "min_p": 0.02,
                "repetition_penalty": 1.1,
                "frequency_penalty": 0.2,
                "presence_penalty": 0.3,
            },
        )
        self.baseline: Baseline | None = None

    # ---- phases ------------------------------------------------------------

    def _run_load(self, label: str, until) -> Load:
        """Load until `until(load, elapsed)` says stop; a progress line every 2 s."""
        load = Load(self.t.url, self.shape).start()
        t0, last = time.monotonic(), 0.0
        while not until(load, time.monotonic() - t0):
            time.sleep(0.25)
            el = time.monotonic() - t0
            if el - last >= 2:
                last = el
                self.say(f"[{label}] {el:5.1f}s  done {load.done}  failed {load.failed}")
        load.stop()
        return load

    def run_baseline(self) -> Baseline:
        ok, _, why = self.t.wait_settled(self.cfg.chaos.settle_s)
        if not ok:
            raise RuntimeError(f"cluster not ready for chaos: {why}")
        c = self.cfg.chaos
        n = len(self.shape.prompts)

        def covered(load: Load, el: float) -> bool:
            seen = {r.prompt for r in load.records if r.completed}
            return el >= c.baseline_s and (len(seen) == n or el >= 4 * c.baseline_s)

        load = self._run_load("baseline", covered)
        texts, mismatched = {}, 0
        for r in sorted(load.records, key=lambda r: r.index):
            if not r.completed:
                continue
            if r.prompt not in texts:
                texts[r.prompt] = r.text
            elif texts[r.prompt] != r.text:
                mismatched += 1
        failed = [r.error for r in load.records if not r.completed]
        if failed:
            raise RuntimeError(
                f"baseline (no fault) had failures: {Counter(failed).most_common(3)}"
            )
        if len(texts) < n:
            raise RuntimeError(f"baseline: only {len(texts)} of {n} prompts completed")
        invalid = sum(1 for r in load.records if r.valid is False)
        if invalid:
            raise RuntimeError(
                f"baseline (no fault): {invalid} structured answers did not validate"
            )
        steady = [r for r in load.records if r.end >= load.started_at + WINDOW_S]
        span = load.stopped_at - load.started_at - WINDOW_S
        self.baseline = Baseline(texts, len(steady) / span, len(load.records), mismatched)
        self.say(
            f"[baseline] {len(load.records)} requests, goodput {self.baseline.goodput:.2f} req/s, "
            f"{mismatched} nondeterministic"
        )
        return self.baseline

    def run_scenario(self, sc: Scenario, monitor: HealthMonitor) -> Result:
        res = Result(sc.name, sc.about)
        th = thresholds_for(self.cfg, sc.name)
        res.thresholds = msgspec.to_builtins(th)
        why = sc.needs(self.cfg)
        if why:
            res.skipped = why
            self.say(f"[{sc.name}] skipped: {why}")
            return res
        ok, state, why = self.t.wait_settled(self.cfg.chaos.settle_s)
        if not ok:
            res.failures.append(f"cluster not settled before the fault: {why}")
            return res
        res.rss_mb_before = rss_mb(state)
        self.t.forget()
        rng = random.Random(f"{self.seed}:{sc.name}")
        window: list[Window] = []
        error: list[BaseException] = []

        def apply():
            try:
                window.append(sc.fault(self.t, sc, rng))
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                error.append(e)

        fault = threading.Thread(target=apply, daemon=True)
        c = self.cfg.chaos
        base: list[float] = []  # recovery's reference goodput
        pre_fault: list[float] = []
        recovered: list[float] = []
        healthy_again: list[float] = []

        def until(load: Load, el: float) -> bool:
            if el < c.warmup_s:
                return False
            if not fault.ident:
                fault.start()
            if error:
                return True
            if not window or el < self.min_duration:
                return False
            w, now = window[0], time.time()
            if not base:
                # The lower of the rate just before the fault and the fault-free pass's:
                # a few seconds of warm-up on shared cores can read high by a third.
                pre = goodput(load.records, load.started_at + RAMP_S, w.start)
                base.append(min(pre, self.baseline.goodput) * self.t.surviving(w.lost))
                pre_fault.append(pre)
            if not recovered:
                good = [r for r in load.records if self._good(r)]
                at = recovery_time(good, w.end, now, base[0])
                if at is not None:
                    recovered.append(at)
            # The load goes on until every replica is healthy again (a killed one back,
            # a killed node replaced), so that its return is served under load too.
            # A worker fault is first seen (or given up on) before that is judged.
            det = monitor.detected(sc.role, w.start) if sc.role else w.end
            if det is None and now < w.start + 2 * self.cfg.router.watchdog_s + 5:
                return False
            back = monitor.healthy_since(max(w.end, det or w.end), w.lost)
            if back is not None and not healthy_again:
                healthy_again.append(back)
            if recovered and healthy_again:
                return now >= max(recovered[0] + WINDOW_S + 2, healthy_again[0] + WINDOW_S)
            given_up = now >= w.recover_from + th.max_recovery_s + WINDOW_S + 2
            return (recovered or given_up) and (healthy_again or now >= w.end + c.settle_s)

        self.say(f"[{sc.name}] {sc.about}")
        load = self._run_load(sc.name, until)
        fault.join(c.stall_s + c.transfer_fault_s + 60)
        healed = None
        if window and window[0].undo is not None:
            window[0].undo()  # a fault left in place for the whole load (and an error too)
            healed = time.time()
        if error:
            self.t.restore_lost()  # a fault that failed part-way
            if isinstance(error[0], Skip):
                res.skipped = str(error[0])
                self.say(f"[{sc.name}] skipped: {res.skipped}")
                return res
            res.failures.append(f"the fault could not be applied: {error[0]!r}")
            return res
        w = window[0]
        res.target, res.fault_start, res.fault_end = w.target, w.start, w.end
        res.load_start, res.load_end = load.started_at, load.stopped_at
        res.records = load.records
        res.health = monitor.between(load.started_at, load.stopped_at)
        res.pre_fault_goodput = round(pre_fault[0], 3) if pre_fault else None
        res.reference_goodput = round(base[0], 3) if base else None
        if healthy_again:
            res.healthy_again_s = round(healthy_again[0] - w.start, 2)
        self._judge(res, load.records, w, recovered[0] if recovered else None, monitor, sc)
        if w.lost:
            res.lost = w.lost
            since = res.recovered_at or w.end + WINDOW_S
            good = [r for r in res.records if self._good(r)]
            res.goodput_after = round(goodput(good, since, load.stopped_at), 3)
            res.thresholds["max_head_cpu"] = sc.params.get("max_head_cpu")
            try:
                cores, res.head_cpu_by = self.t.head_cpu(sc.params["head_window_s"])
                res.head_cpu = round(cores, 3)
            finally:
                self.t.restore_lost()  # the next scenario has every node again
        ok, state, why = self.t.wait_settled(c.settle_s)
        res.settled, res.unsettled_reason = ok, why
        res.fenced = len(w.fenced)
        if ok and self.t.testbed is not None:
            self._views(res, w, healed or w.end)
        res.leaked = {k: state[k] for k in ZERO_KEYS if state and state[k]} if state else {}
        res.rss_mb_after = rss_mb(state)
        self._check(res, th)
        self.say(
            f"[{sc.name}] {'PASS' if res.passed else 'FAIL'}: {res.succeeded}/{res.sent} ok, "
            f"{res.failed} failed, {res.hung} hung, {res.corrupted} corrupted, detect "
            f"{_s(res.detect_s)}, recover {_s(res.recover_s)}"
            + (
                f"; survivors {res.goodput_after} req/s, head {_s(res.head_cpu, '{:.1%}')} "
                f"of a core"
                if res.lost
                else ""
            )
            + (f"; missed: {'; '.join(res.failures)}" if res.failures else "")
        )
        return res

    def _views(self, res: Result, w: Window, healed: float) -> None:
        """Testbed only: the fenced processes gone, the nodes the fault had to spare still
        alive in Ray's view, and every view of who is alive the same, by `healed` (the
        fault's end, or the heal of one left in place for the load) + settle_s."""
        bed = self.t.testbed
        deadline = healed + self.cfg.chaos.settle_s
        while True:
            res.stale = bed.still_running(w.fenced)
            why = self.t.views_disagree()
            if not why and not res.stale:
                res.views_agree_s = round(time.time() - healed, 2)
                break
            if time.time() > deadline:
                break
            time.sleep(0.5)
        if res.stale:
            res.failures.append(f"processes from before the fault still run: {res.stale}")
        if why:
            res.failures.append(f"views of who is alive disagree: {why}")
        import ray

        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        lost = [n[:8] for n in w.survivors if n not in alive]
        if lost:
            res.failures.append(f"Ray declared {lost} dead during a fault it should outlast")

    # ---- judging -----------------------------------------------------------

    def _good(self, r: Record) -> bool:
        """A 200 that ran to its end with the fault-free text."""
        return r.completed and r.text == self.baseline.texts[r.prompt]

    def _judge(self, res: Result, records: list[Record], w: Window, rec_at, monitor, sc) -> None:
        texts = self.baseline.texts
        tally(res, records, texts, w)
        det = monitor.detected(sc.role, w.start)
        res.detect_s = None if det is None else round(det - w.start, 2)
        res.recovered_at = rec_at
        res.recover_s = None if rec_at is None else round(max(0.0, rec_at - w.recover_from), 2)
        until = (rec_at + WINDOW_S) if rec_at is not None else max(r.end for r in records)
        during = [r for r in records if r.start <= until and r.end >= w.start]
        lat = [r.latency for r in during if r.completed]
        res.latency_p50_s = _round(percentile(lat, 50))
        res.latency_p99_s = _round(percentile(lat, 99))
        res.ttft_p99_s = _round(percentile([r.ttft for r in during if r.ttft is not None], 99))
        good = sum(
            1
            for r in records
            if r.completed and w.start <= r.end <= until and r.text == texts[r.prompt]
        )
        span = max(until - w.start, WINDOW_S)
        ref = res.reference_goodput or self.baseline.goodput
        res.goodput_kept = round(good / (ref * span), 3)

    def _check(self, res: Result, th: Thresholds) -> None:
        f = res.failures
        res.excused = res.failed_in_flight if th.excuse_in_flight else 0
        if res.success_rate < th.min_success_rate:
            f.append(f"success {res.success_rate:.2%} < {th.min_success_rate:.2%}")
        if res.hung > th.max_hung:
            f.append(f"{res.hung} hung > {th.max_hung}")
        if res.corrupted > th.max_corrupted:
            f.append(f"{res.corrupted} corrupted > {th.max_corrupted}")
        if res.recover_s is None or res.recover_s > th.max_recovery_s:
            f.append(f"recovery {_s(res.recover_s)} > {th.max_recovery_s}s")
        if not res.settled:
            f.append(f"did not settle: {res.unsettled_reason}")
        if sum(res.leaked.values()) > th.max_leaked:
            f.append(f"leaked {res.leaked}")
        head = res.thresholds.get("max_head_cpu")
        if head is not None and (res.head_cpu is None or res.head_cpu > head):
            by = ", ".join(f"{k} {v:.0%}" for k, v in res.head_cpu_by.items() if v >= 0.005)
            f.append(f"head at {_s(res.head_cpu, '{:.0%}')} of a core > {head:.0%} ({by})")


def tally(res: Result, records: list[Record], texts: dict, w: Window) -> None:
    """Count each request into `res` once: succeeded, hung, corrupted or failed, and of
    the failures, those in flight at the fault. A structured answer that does not
    validate against its schema is corrupted, whatever its text."""
    errors = Counter()
    for r in records:
        res.sent += 1
        if r.hung:
            res.hung += 1
        elif r.completed and r.text == texts[r.prompt] and r.valid is not False:
            res.succeeded += 1
        elif r.completed:
            res.corrupted += 1
        else:
            res.failed += 1
            errors[r.error or "unknown"] += 1
            if r.start <= w.end + IN_FLIGHT_GRACE_S and r.end >= w.start:
                res.failed_in_flight += 1
    res.errors = dict(errors.most_common(8))


def goodput(records: list[Record], start: float, end: float) -> float:
    """Completed requests per second that ended in [start, end)."""
    n = sum(1 for r in records if r.end is not None and r.completed and start <= r.end < end)
    return n / max(end - start, 1e-9)


def recovery_time(records: list[Record], since: float, now: float, base: float) -> float | None:
    """Start of the first WINDOW_S window beginning at or after `since` (and ended by
    `now`) whose completed requests per second reach RECOVERED of `base`."""
    ends = sorted(r.end for r in records if r.end is not None and r.completed)
    t = since
    while t + WINDOW_S <= now:
        n = sum(1 for e in ends if t <= e < t + WINDOW_S)
        if n / WINDOW_S >= RECOVERED * base:
            return t
        t += 0.5
    return None


def _round(v):
    return None if v is None else round(v, 3)


def _s(v, fmt: str = "{:.1f}s") -> str:
    return "-" if v is None else fmt.format(v)


def run(
    target: Target,
    names: list[str],
    out_dir: str,
    *,
    seed: int = 0,
    min_duration: float = 0.0,
    progress=print,
):
    """Baseline, then every named scenario; writes the report. Returns (passed, report)."""
    from chaos import report

    os.makedirs(out_dir, exist_ok=True)
    h = Harness(target, seed=seed, min_duration=min_duration, progress=progress)
    with HealthMonitor(target) as monitor:
        h.run_baseline()
        results = []
        for name in names:
            res = h.run_scenario(SCENARIOS[name], monitor)
            results.append(res)
            if res.skipped is None and res.sent:
                res.timeline = report.timeline(res, h.baseline, out_dir)
    rep = report.write(out_dir, target.cfg, h.baseline, results, seed)
    return all(r.passed for r in results), rep
