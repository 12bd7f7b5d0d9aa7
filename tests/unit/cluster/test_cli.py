"""The command line and the Makefile agree on where the model cache is."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_make_and_the_cli_use_one_model_cache():
    """`make serve` must not point the cache somewhere `pdcluster up` run by hand
    would not look (that fetched and converted the model a second time)."""
    env = {k: v for k, v in os.environ.items() if k != "PDCLUSTER_CACHE"}
    db = subprocess.run(
        ["make", "-pn", "-C", str(ROOT), "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "PDCLUSTER_CACHE" not in db
    code = "from wire.host import cache_dir; print(cache_dir())"
    out = subprocess.run(
        [str(ROOT / ".venv/bin/python"), "-c", code],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    assert out == str(Path.home() / ".cache" / "pdcluster")
