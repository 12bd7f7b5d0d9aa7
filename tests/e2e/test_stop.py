"""Stopping `pdcluster up` is clean: SIGTERM to the process alone or to its whole
process group (what a supervisor does), or Ctrl-C in the terminal that ran it under a
shell or `make` (SIGINT to that foreground group), ends every process it started within
15 s, and none is left burning CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support import ROOT

STOP_S = 15.0


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (by parent links)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rpartition(")")[2].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")[:80]
    except FileNotFoundError:
        return "?"


def _signals(pid: int) -> str:
    """The process's blocked, ignored and caught signal masks (for a failure message)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except FileNotFoundError:
        return "?"
    keep = ("SigBlk", "SigIgn", "SigCgt")
    return " ".join(ln.replace("\t", "") for ln in lines if ln[:6] in keep)


def _terminal_job() -> None:
    """A terminal's foreground job gets Ctrl-C with SIGINT at its default and unblocked,
    whatever this test process inherited (a job started with `&` ignores it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.parametrize("target", ["process", "group", "terminal"])
def test_a_stop_signal_stops_everything_it_started(tmp_path, target):
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["router"]["port"] = port = 8019
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg))
    up = [sys.executable, "-m", "cluster.cli", "up", str(path)]
    if target == "terminal":  # under a shell, as `make serve` runs it: not a group leader
        up = ["bash", "-c", " ".join(up) + "; true"]
    proc = subprocess.Popen(
        up,
        cwd=ROOT,
        start_new_session=True,  # its own process group, as a terminal would give it
        preexec_fn=_terminal_job if target == "terminal" else None,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, "pdcluster up exited early"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "cluster did not come up"
            time.sleep(1)
        # Busy when stopped: streams decoding (and queued for KV) on every worker.
        body = {
            "model": "tiny-llama",
            "prompt": "keep going " * 20,
            "max_tokens": 400,
            "ignore_eos": True,
            "stream": True,
        }
        streams = [
            subprocess.Popen(
                [
                    "curl",
                    "-sN",
                    "-o",
                    "/dev/null",
                    "-H",
                    "Content-Type: application/json",
                    "-d",
                    json.dumps(body),
                    f"http://127.0.0.1:{port}/v1/completions",
                ]
            )
            for _ in range(24)
        ]
        time.sleep(3)
        started = _descendants(proc.pid)
        assert len(started) > 5  # raylets, GCS, workers, Serve
        t0 = time.monotonic()
        if target == "group":
            os.killpg(proc.pid, signal.SIGTERM)
        elif target == "terminal":
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group
        else:
            proc.send_signal(signal.SIGTERM)
        while (proc.poll() is None or any(_alive(p) for p in started)) and (
            time.monotonic() - t0 < STOP_S
        ):
            time.sleep(0.2)
        left = sorted((p, _cmd(p)) for p in started if _alive(p))
        assert proc.poll() is not None and not left, (
            f"after {STOP_S}s: up {'running' if proc.poll() is None else 'gone'}, left {left}; "
            f"signal masks: {[(p, _signals(p)) for p in started if 'cluster.cli' in _cmd(p)]}"
        )
    finally:
        for s in locals().get("streams", []):
            s.kill()
        for p in [proc.pid, *_descendants(proc.pid), *locals().get("started", [])]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
