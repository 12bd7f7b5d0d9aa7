"""`pdcluster bench`'s arithmetic (bench/main.py) on hand-made records: SLO parsing,
goodput counting only completed requests that meet every target, TPOT and ITL from
chunk times, and the report's table and plots."""

from __future__ import annotations

import pytest

from bench.main import Slo, Workload, parse_range, plot, summarize, table, tpot
from chaos.load import Record


def rec(i, start, first, chunks, tokens, status=200, finish="length", error=None):
    return Record(
        index=i,
        prompt=i,
        start=start,
        first=first,
        end=chunks[-1] if chunks else start + 1,
        status=status,
        error=error,
        tokens=tokens,
        finish_reason=finish,
        chunk_times=chunks,
    )


def test_slo_and_ranges_parse_and_refuse_nonsense():
    assert Slo.parse("ttft=0.5,tpot=0.1") == Slo(ttft=0.5, tpot=0.1)
    assert Slo.parse(None) == Slo()
    for bad in ("ttft", "latency=1", "ttft=-1"):
        with pytest.raises(ValueError):
            Slo.parse(bad)
    assert parse_range("64") == (64, 64) and parse_range("32-128") == (32, 128)
    for bad in ("0", "9-3", "x"):
        with pytest.raises(ValueError):
            parse_range(bad)


def test_goodput_counts_completed_requests_meeting_every_slo():
    fast = rec(0, 0.0, 0.2, [0.2, 0.3, 0.4, 0.5], 4)  # TTFT 0.2, TPOT 0.1
    slow_first = rec(1, 0.0, 0.9, [0.9, 1.0, 1.1, 1.2], 4)  # TTFT 0.9
    slow_tokens = rec(2, 0.0, 0.1, [0.1, 0.5, 0.9, 1.3], 4)  # TPOT 0.4
    failed = rec(3, 0.0, 0.1, [0.1, 0.2], 2, error="stream cut off")
    assert tpot(fast) == pytest.approx(0.1) and tpot(slow_tokens) == pytest.approx(0.4)
    s = summarize([fast, slow_first, slow_tokens, failed], 2.0, Slo(ttft=0.5, tpot=0.15))
    assert (s["completed"], s["failed"], s["good"]) == (3, 1, 1)
    assert s["goodput"] == pytest.approx(0.5)
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_tok_s"] == pytest.approx(6.0)
    assert s["ttft_s"]["p50"] == pytest.approx(0.2) and s["ttft_s"]["p99"] == pytest.approx(0.9)
    assert s["itl_s"]["p99"] == pytest.approx(0.4)
    assert summarize([fast], 1.0, Slo())["good"] == 1  # no SLO: every completed one


def test_workload_is_seeded_and_shares_the_system_prompt():
    w = Workload(prompt_tokens=(5, 9), output_tokens=(8, 16), system_prompt_tokens=50)
    prompts, lengths = w.prompts()
    assert (prompts, lengths) == w.prompts()
    system = prompts[0].split("\n")[0]
    assert len(system.split()) == 50 and all(p.startswith(system + "\n") for p in prompts)
    assert all(8 <= n <= 16 for n in lengths) and len(set(prompts)) == len(prompts)


def test_table_and_plots_show_both_endpoints(tmp_path):
    r = summarize([rec(0, 0.0, 0.2, [0.2, 0.3], 2)], 1.0, Slo())
    report = {
        "urls": ["http://a", "http://b"],
        "slo": {"ttft": None},
        "points": [
            {
                "rate": x,
                "concurrency": 8,
                "results": {"http://a": r, "http://b": r},
                "ratio": {"output_tok_s": 1.0, "goodput": 1.0, "request_throughput": 1.0},
            }
            for x in (1.0, 2.0)
        ],
    }
    text = table(report)
    assert "http://a" in text and "http://b" in text and "goodput 1.00x" in text
    for p in plot(report, tmp_path):
        assert p.stat().st_size > 10_000
