"""The GEMM path chosen by measuring on this CPU (workers/gemm.py): every candidate
computes what F.linear does, the plan covers every weight shape and row bucket with
a candidate that exists here, it is cached per machine type and read back without
measuring, and the model's logits are the same whichever paths are chosen."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from workers import gemm
from workers.runner import ModelRunner


def test_every_candidate_agrees_with_f_linear():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g)
    paths = gemm.candidates(w)
    assert "linear" in paths
    for rows in (1, 8, 200):
        x = torch.randn(rows, 64, generator=g)
        for path, prepared in paths.items():
            torch.testing.assert_close(gemm.run(path, x, w, prepared), F.linear(x, w))


def test_plan_is_measured_once_per_machine_type_and_read_back(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(96, 64, generator=g), torch.randn(64, 96, generator=g)]
    cache = tmp_path / "gemm-plans.json"
    plan = gemm.choose(ws, cache)
    assert set(plan) == {"96x64", "64x96"}
    for route in plan.values():
        assert len(route) == len(gemm.BUCKETS)
        assert set(route) <= set(gemm.candidates(ws[0]))
    stored = json.loads(cache.read_text())
    key = gemm.plan_key(ws[0])
    assert stored[key] == plan and gemm.cpu_model() in key and "torch.float32 on cpu" in key

    def no_measuring(_w):
        raise AssertionError("measured again")

    monkeypatch.setattr(gemm, "measure", no_measuring)
    assert gemm.choose(ws, cache) == plan


def test_one_alternative_layout_per_weight_where_it_beats_f_linear():
    secs = {
        "1": {"linear": 1.0, "mkl_packed": 2.0, "onednn": 0.9},
        "2-127": {"linear": 5.0, "mkl_packed": 3.0, "onednn": 4.5},
        "128+": {"linear": 9.0, "mkl_packed": 9.5, "onednn": 8.0},
    }
    # mkl_packed saves 2.0 in all, onednn 1.6: one copy only, where it wins.
    assert gemm.route_for(secs) == ["linear", "mkl_packed", "linear"]
    assert gemm.route_for({b: {"linear": 1.0} for b in secs}) == ["linear"] * 3


def test_pinned_path_and_other_dtypes_are_not_measured(tmp_path, monkeypatch):
    monkeypatch.setattr(gemm, "measure", lambda w: pytest.fail("measured"))
    w = torch.zeros(8, 4)
    assert gemm.choose([w.to(torch.bfloat16)], tmp_path / "p.json") == {"8x4": ["linear"] * 3}
    monkeypatch.setenv("PDCLUSTER_GEMM", "mkl_packed")
    assert gemm.choose([w], tmp_path / "p.json") == {"8x4": ["mkl_packed"] * 3}
    assert not (tmp_path / "p.json").exists()


def test_logits_are_the_same_on_every_path_this_build_has(tiny_model_dir):
    runner = ModelRunner(tiny_model_dir, max_model_len=128, num_blocks=8, block_size=16)
    lm = runner.model.lm_head
    paths = set(gemm.candidates(lm.weight.detach())) - {"linear"}
    assert paths or not (torch._C.has_mkl or torch.backends.mkldnn.is_available())
    h = torch.randn(5, lm.weight.shape[1], generator=torch.Generator().manual_seed(2))
    want = lm.logits(h)
    for path in sorted(paths):
        lm.set_route((path, path, path))
        assert lm.route == (path, path, path)
        torch.testing.assert_close(lm.logits(h), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(lm.logits(h[:1]), want[:1], rtol=1e-4, atol=1e-4)
