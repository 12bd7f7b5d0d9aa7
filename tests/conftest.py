"""Session fixtures shared by all test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from workers.tiny import tiny_model_dir

    return tiny_model_dir()
