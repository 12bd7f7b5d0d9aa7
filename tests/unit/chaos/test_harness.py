"""The chaos harness's judging, thresholds and report, and its load generator
against a small local SSE server that answers in every way a cluster can."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from chaos import harness, report, soak
from chaos.config import parse_chaos_config
from chaos.load import Load, LoadShape, Record, make_prompts, percentile
from chaos.target import HealthMonitor, Target
from cluster.config import ConfigError, parse_config


def _cfg(**chaos):
    return parse_chaos_config({"cluster": {"address": "auto"}, "chaos": chaos})


def _done(i: int, end: float, text: str = "t", prompt: int = 0) -> Record:
    return Record(
        index=i, prompt=prompt, start=end - 0.5, first=end - 0.4, end=end, status=200,
        text=text, finish_reason="length",
    )  # fmt: skip


def test_recovery_is_the_first_window_back_at_90_percent_of_baseline():
    # 10 req/s until t=10, nothing until t=15, then 10 req/s again.
    ends = [i / 10 for i in range(100)] + [15 + i / 10 for i in range(100)]
    records = [_done(i, e) for i, e in enumerate(ends)]
    assert harness.recovery_time(records, since=10.0, now=30.0, base=10.0) == 15.0
    assert harness.recovery_time(records, since=10.0, now=16.0, base=10.0) is None  # not seen yet
    # A fault with no effect recovers at once.
    assert harness.recovery_time(records, since=2.0, now=30.0, base=10.0) == 2.0


def test_thresholds_per_scenario_override_the_defaults():
    cfg = _cfg(scenarios={"kill-router": {"min_success_rate": 0.9}})
    assert harness.thresholds_for(cfg, "kill-router").min_success_rate == 0.9
    assert harness.thresholds_for(cfg, "kill-router").max_hung == 0
    assert harness.thresholds_for(cfg, "kill-decode-node").min_success_rate == 0.995


@pytest.mark.parametrize(
    "chaos, path",
    [
        ({"scenarios": {"kill-everything": {}}}, "chaos.scenarios.kill-everything"),
        ({"scenarios": {"kill-router": {"max_typos": 1}}}, "chaos.scenarios.kill-router.max_typos"),
        ({"scenarios": {"kill-router": {"excuse_in_flight": 1}}}, "excuse_in_flight"),
        ({"scenarios": {"kill-router": {"max_hung": True}}}, "kill-router.max_hung"),
        ({"concurrency": 0}, "chaos.concurrency"),
        ({"thresholds": {"min_success_rate": 2}}, "chaos.thresholds.min_success_rate"),
        ({"soak": {"rejected_share": 1.0}}, "chaos.soak.rejected_share"),
        ({"soak": {"fault_every_s": -1}}, "chaos.soak.fault_every_s"),
    ],
)
def test_bad_chaos_config_names_the_key(chaos, path):
    with pytest.raises(ConfigError, match=path):
        _cfg(**chaos)


def test_missed_thresholds_are_each_named():
    cfg = _cfg()
    res = harness.Result("x", "about", sent=100, succeeded=97, failed=1, hung=1, corrupted=1)
    res.recover_s, res.leaked = 25.0, {"decode_blocks_used": 3}
    harness.Harness._check(None, res, harness.thresholds_for(cfg, "x"))
    text = "; ".join(res.failures)
    for part in ("success 97.00%", "1 hung", "1 corrupted", "recovery 25.0s", "leaked"):
        assert part in text
    assert not res.passed


def test_excuse_in_flight_leaves_out_only_failures_in_flight_at_the_fault():
    from chaos.scenarios import Window

    def cut(i, start, end):
        return Record(index=i, prompt=0, start=start, end=end, status=200, error="cut")

    records = [_done(i, 90 + i) for i in range(8)]  # ended before the fault at t=100
    records += [cut(8, 99.0, 100.2), cut(9, 95.0, 100.1), cut(10, 100.5, 100.6)]
    records += [cut(11, 103.0, 104.0)]  # sent well after the fault: never excused
    res = harness.Result("kill-router", "x")
    harness.tally(res, records, {0: "t"}, Window(100.0, 100.0, "router"))
    assert (res.sent, res.succeeded, res.failed, res.failed_in_flight) == (12, 8, 4, 3)
    th = harness.thresholds_for(
        _cfg(scenarios={"kill-router": {"excuse_in_flight": True}}), "kill-router"
    )
    harness.Harness._check(None, res, th)
    assert res.excused == 3 and res.success_rate == 8 / 9
    assert "success 88.89%" in "; ".join(res.failures)
    res.failures = []
    harness.Harness._check(None, res, harness.thresholds_for(_cfg(), "kill-router"))
    assert res.excused == 0 and res.success_rate == 8 / 12


def test_a_node_lost_for_good_is_judged_against_its_survivors():
    """lose-node: recovery is against the share of replicas left, the load stops once the
    survivors are healthy and the lost ones seen as not, and a busy head is named."""
    target = Target(_cfg(), "http://127.0.0.1:9")
    target.cfg = parse_config(
        {"cluster": {"address": "auto"}, "prefill": {"replicas": 2}, "decode": {"replicas": 3}}
    )
    try:
        assert target.surviving({}) == 1.0
        assert target.surviving({"decode": 1, "prefill": 1}) == 0.5
        monitor = HealthMonitor(target)
        lost = {"decode": 1, "prefill": 1}
        h = {"status": "ok", "prefill_healthy": 2, "decode_healthy": 3, "lost": []}
        assert monitor.all_healthy(h) and not monitor.all_healthy(h, lost)  # loss not seen yet
        h.update(prefill_healthy=1, decode_healthy=2)
        assert monitor.all_healthy(h, lost) and not monitor.all_healthy(h)
        assert not monitor.all_healthy(None, lost)
    finally:
        target.close()
    res = harness.Result("lose-node", "x", sent=10, succeeded=10, recover_s=1.0)
    res.thresholds, res.head_cpu = {"max_head_cpu": 0.1}, 1.84
    res.head_cpu_by = {"DashboardAgent": 0.92, "gcs_server": 0.91, "raylet": 0.01}
    harness.Harness._check(None, res, harness.thresholds_for(_cfg(), "lose-node"))
    assert res.failures == [
        "head at 184% of a core > 10% (DashboardAgent 92%, gcs_server 91%, raylet 1%)"
    ]
    res.failures, res.head_cpu = [], 0.04
    harness.Harness._check(None, res, harness.thresholds_for(_cfg(), "lose-node"))
    assert res.passed


def test_report_table_has_one_row_per_scenario(tmp_path):
    cfg = _cfg()
    base = harness.Baseline({0: "t"}, goodput=10.0, requests=50, nondeterministic=0)
    ok = harness.Result("kill-decode-worker", "a", sent=10, succeeded=10, recover_s=1.0)
    ok.records = [_done(i, 100 + i / 5) for i in range(10)]
    ok.load_start, ok.fault_start, ok.fault_end = 99.0, 100.0, 100.0
    ok.timeline = report.timeline(ok, base, str(tmp_path))
    skipped = harness.Result("kill-tp-rank", "b", skipped="tp is 1")
    lost = harness.Result("lose-node", "c", sent=5, succeeded=5, recover_s=2.0, goodput_after=9.5)
    lost.lost, lost.head_cpu, lost.head_cpu_by = {"decode": 1}, 0.031, {"gcs_server": 0.02}
    rep = report.write(str(tmp_path), cfg, base, [ok, skipped, lost], seed=3)
    assert rep["passed"] and json.loads((tmp_path / "report.json").read_text())["seed"] == 3
    md = (tmp_path / "report.md").read_text()
    assert "| kill-decode-worker | 10 | 10 | 0 | 0 | 0 | 100.0% |" in md
    assert "skipped: tp is 1" in md
    assert "Lost for good: 1 decode. Survivors' goodput 9.50 req/s" in md
    assert "3.1% of a core (gcs_server 2.0%)" in md
    assert (tmp_path / "kill-decode-worker.png").stat().st_size > 10_000


def test_soak_growth_is_a_slope_per_process_and_restarts_start_a_new_series():
    samples = []
    for k in range(20):
        pid = 1 if k < 12 else 2  # decode-0 restarted at sample 12
        samples.append(
            {
                "requests": k * 1000,
                "procs": {
                    "router": (9, (100 + k) * 2**20, 40),  # +1 MB per 1000 requests
                    "decode-0": (pid, 300 * 2**20, 50),
                },
            }
        )
    g = soak._growth(samples)
    assert g["router (pid 9)"]["rss_mb_per_10k"] == pytest.approx(10.0)
    assert g["decode-0 (pid 1)"]["rss_mb_per_10k"] == 0.0
    assert g["decode-0 (pid 2)"]["rss_mb_per_10k"] == 0.0


def test_soak_growth_after_a_warm_up_counted_in_requests():
    """RSS that climbs while caches fill, then stays flat: no growth once warmed up."""
    samples = [
        {"requests": k * 1000, "procs": {"router": (9, (100 + min(k, 25)) * 2**20, 40)}}
        for k in range(60)
    ]
    assert soak._growth(samples)["router (pid 9)"]["rss_mb_per_10k"] > 0.5
    g = soak._growth(samples, warmup_requests=25_000)["router (pid 9)"]
    assert g["rss_mb_per_10k"] == 0.0 and g["requests"] == 34_000


def test_percentile_and_prompts():
    assert percentile([], 50) is None
    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile([3.0], 50) == 3.0
    assert make_prompts(5, seed=1) == make_prompts(5, seed=1) != make_prompts(5, seed=2)
    assert len(set(make_prompts(50))) == 50


# ---- the load generator against a real (small) HTTP server --------------------------


class _Endpoint(BaseHTTPRequestHandler):
    """/v1/completions answering by the prompt's first word: ok, error (a mid-stream
    error event), cut (the connection ends mid-stream), 429, or slow (never ends)."""

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        kind = body["prompt"].split()[0]
        if len(body["prompt"].split()) > 64:  # over this endpoint's context
            kind, code = "400", "context_length_exceeded"
        else:
            code = kind
        if kind in ("429", "400"):
            err = {"error": {"message": "no", "type": "x", "code": code}}
            self._answer(int(kind), json.dumps(err).encode())
            return
        if not body["stream"]:
            answer = {
                "choices": [{"index": 0, "text": "hello", "finish_reason": "length"}],
                "usage": {"prompt_tokens": 2, "completion_tokens": 2},
            }
            self._answer(200, json.dumps(answer).encode())
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()

        def event(obj):
            self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
            self.wfile.flush()

        event({"choices": [{"index": 0, "text": "he", "finish_reason": None}]})
        if kind == "slow":
            threading.Event().wait(3)
            return
        if kind == "cut":
            return
        if kind == "error":
            event({"error": {"message": "decode lost", "code": 503}})
        else:
            event({"choices": [{"index": 0, "text": "llo", "finish_reason": "length"}]})
            event({"choices": [], "usage": {"completion_tokens": 2}})
        self.wfile.write(b"data: [DONE]\n\n")

    def _answer(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_load_records_every_way_a_request_ends(endpoint):
    shape = LoadShape(
        prompts=["ok a", "error b", "cut c", "429 d", "slow e"],
        max_tokens=2,
        model="m",
        concurrency=5,
        hung_after_s=1.0,
    )
    load = Load(endpoint, shape).start()
    while len({r.prompt for r in load.records if r.end}) < 5:
        threading.Event().wait(0.05)
    by = {}
    for r in load.stop():
        by.setdefault(r.prompt, r)
    ok, err, cut, full, slow = (by[i] for i in range(5))
    assert ok.completed and ok.text == "hello" and ok.tokens == 2 and ok.ttft is not None
    assert not err.completed and err.error == "stream error 503: decode lost" and err.text == "he"
    assert not cut.completed and cut.error == "stream cut off"
    assert full.status == 429 and full.error == "429 429: no"
    assert slow.hung and not slow.completed


@pytest.mark.parametrize("rate", [None, 50.0])
def test_load_with_a_total_sends_exactly_that_many_then_finishes(endpoint, rate):
    """`pdcluster bench --requests N`: N requests, closed loop or Poisson, then the
    load ends by itself."""
    from bench.main import run_point

    shape = LoadShape(prompts=["ok"], max_tokens=2, model="m", concurrency=4, rate=rate, total=7)
    records, wall = run_point(endpoint, shape, 0, "test")
    assert len(records) == 7 and all(r.completed for r in records)
    assert sorted(r.index for r in records) == list(range(7))
    assert wall >= max(r.end for r in records) - min(r.start for r in records) > 0


@pytest.mark.parametrize("stream", [True, False])
def test_load_sends_a_share_of_over_long_prompts_and_expects_them_refused(endpoint, stream):
    """The soak's mix: one request in five carries a prompt over the context (a 400)."""
    from chaos.load import over_long_prompt

    shape = LoadShape(
        prompts=["ok a"],
        max_tokens=2,
        model="m",
        concurrency=3,
        total=20,
        stream=stream,
        rejected_share=0.2,
        rejected_prompt=over_long_prompt(64),
    )
    load = Load(endpoint, shape).start()
    while not load.finished:
        threading.Event().wait(0.05)
    records = sorted(load.stop(), key=lambda r: r.index)
    assert [r.index for r in records if r.rejected] == [4, 9, 14, 19]
    assert all(r.refused and not r.completed for r in records if r.rejected)
    assert all(r.completed and r.text == "hello" for r in records if not r.rejected)
    assert len(over_long_prompt(64).split()) == 65


def test_a_structured_answer_that_does_not_validate_is_corrupted():
    """The chaos load's JSON-schema and tool-call requests: the same text as the
    baseline is not enough, the answer must validate against its schema too."""
    from chaos.load import format_fields, format_kind, format_schema, format_valid
    from chaos.scenarios import Window

    shape = LoadShape(prompts=["p"] * 8, max_tokens=32, model="m", formats=True)
    kinds = [format_kind(shape, i) for i in range(8)]
    assert kinds == [None, None, "json", None, "tool", None, "json", None]
    assert format_valid("json", '["n", "s"]', 32) and not format_valid("json", '["n", ', 32)
    assert format_valid("tool", '{"way": ["w"]}', 32) and not format_valid("tool", '["w"]', 32)
    worst = '{"way": [' + ", ".join(
        ['"n"'] * format_schema(32, True)["properties"]["way"]["maxItems"]
    )
    assert len(worst + "]}") <= 32  # any tokenizer's answer fits max_tokens
    assert "response_format" in format_fields("json", 32) and "tools" in format_fields("tool", 32)
    records = [_done(0, 90.0), _done(1, 91.0)]
    records[0].valid, records[1].valid = True, False
    res = harness.Result("kill-decode", "x")
    harness.tally(res, records, {0: "t"}, Window(100.0, 100.0, "decode"))
    assert (res.succeeded, res.corrupted) == (1, 1)
