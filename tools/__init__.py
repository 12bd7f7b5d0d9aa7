"""Developer tools: `python -m tools.<name>`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_or_check(out: Path, render, command: str, argv: list[str] | None, about: str) -> int:
    """The command line of a generated document: write `out` from `render()`, or with
    `--check` exit 1 when it differs (saying `command`, which rewrites it)."""
    ap = argparse.ArgumentParser(prog=command, description=about)
    ap.add_argument("--check", action="store_true", help=f"exit 1 if {out.name} is out of date")
    args = ap.parse_args(argv)
    text, name = render(), out.relative_to(ROOT)
    if args.check:
        if not out.exists() or out.read_text() != text:
            print(f"{name} is out of date: run `{command}`", file=sys.stderr)
            return 1
        print(f"{name}: up to date")
        return 0
    out.write_text(text)
    print(f"wrote {name}")
    return 0
