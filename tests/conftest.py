"""Session fixtures shared by all test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


# Tests that kill, freeze or starve parts of a running cluster.
_CHAOS = {"test_router_faults.py", "test_overload.py"}


def pytest_collection_modifyitems(items):
    """Markers by place: tests/unit -> unit, tests/integration -> integration,
    tests/e2e -> e2e, tests/chaos -> chaos, plus chaos for the fault modules in e2e
    (`pytest -m unit` while working)."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        for kind in ("unit", "integration", "e2e", "chaos"):
            if kind in parts:
                item.add_marker(kind)
        if Path(str(item.fspath)).name in _CHAOS:
            item.add_marker("chaos")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from workers.tiny import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def hf(tiny_model_dir):
    """The tiny model in Hugging Face transformers (float32) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)
