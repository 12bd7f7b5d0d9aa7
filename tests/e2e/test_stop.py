"""Stopping `pdcluster up` is clean: SIGTERM to the process alone or to its whole
process group (what a supervisor does), or Ctrl-C in the terminal that ran it under a
shell or `make` (SIGINT to that foreground group), while it serves or while it is still
starting, ends every process it started within 15 s, and none is left burning CPU. A
requested stop is not a crash: exit status 0 and no stack dump."""

from __future__ import annotations

import json
import os
import re
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
# What a crash leaves on stderr: a Python traceback, Ray's C++ failure handler's dump
# ("*** SIGTERM received at ... / PC: @"), a failed Ray check, a fatal Python error.
DUMP = re.compile(r"Traceback \(most recent|\*\*\* SIG|PC: @|Check failed|Fatal Python error")


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


def _cmd(pid: int, limit: int | None = 80) -> str:
    """The process's command line, cut to `limit` characters for a message; whole for a
    match (a checkout at a longer path pushes a binary's name past 80 characters)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")[:limit]
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


def _starting(pid: int, moment: str) -> bool:
    """`ray`: the local cluster's first Ray process is up and the CLI has not connected
    to it yet; `workers`: the worker actors' processes are starting (a real start-up
    spends minutes here, loading weights)."""
    cmds = [_cmd(p, limit=None) for p in _descendants(pid)]
    if moment == "ray":
        return any("gcs_server" in c for c in cmds)
    return any("ray::PrefillWorker" in c or "ray::DecodeWorker" in c for c in cmds)


# A signal to the whole group while serving is the terminal's Ctrl-C (SIGINT); SIGTERM to
# the group is tested while the workers start (time: each case starts a cluster).
@pytest.mark.parametrize(
    "target,moment",
    [
        ("process", "serving"),
        ("terminal", "serving"),
        ("process", "ray"),
        ("group", "workers"),
        ("terminal", "workers"),
    ],
)
def test_a_stop_signal_stops_everything_it_started(tmp_path, target, moment):
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["router"]["port"] = port = 8019
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg))
    up = [sys.executable, "-m", "pdcluster.cli", "up", str(path)]
    if target == "terminal":  # under a shell, as `make serve` runs it: not a group leader
        up = ["bash", "-c", " ".join(up) + "; true"]
    proc = subprocess.Popen(
        up,
        cwd=ROOT,
        start_new_session=True,  # its own process group, as a terminal would give it
        preexec_fn=_terminal_job if target == "terminal" else None,
        stdout=subprocess.DEVNULL,
        stderr=(stderr := (tmp_path / "stderr").open("w")),
    )
    streams = []
    try:
        deadline = time.monotonic() + 180
        while moment != "serving":
            assert proc.poll() is None, "pdcluster up exited early"
            if _starting(proc.pid, moment):
                break
            assert time.monotonic() < deadline, f"no {moment} process started"
            time.sleep(0.1)
        while moment == "serving":
            assert proc.poll() is None, "pdcluster up exited early"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "cluster did not come up"
            time.sleep(1)
        if moment == "serving":
            streams = _busy(port)
        started = _descendants(proc.pid)
        assert len(started) > (5 if moment == "serving" else 1)  # reaper, GCS, raylets, workers
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
            started |= _descendants(proc.pid)  # still starting: what it starts meanwhile too
            time.sleep(0.2)
        took = time.monotonic() - t0
        left = sorted((p, _cmd(p)) for p in started if _alive(p))
        assert proc.poll() is not None and not left, (
            f"after {took:.1f}s: up {'running' if proc.poll() is None else 'gone'}, left {left}; "
            f"signal masks: {[(p, _signals(p)) for p in started if 'pdcluster.cli' in _cmd(p)]}"
        )
        print(f"{target} at {moment}: stopped in {took:.1f}s, exit status {proc.returncode}")
        err = (tmp_path / "stderr").read_text()
        dumps = [ln for ln in err.splitlines() if DUMP.search(ln)]
        assert proc.returncode == 0 and not dumps, (
            f"stopped in {took:.1f}s with exit status {proc.returncode}; {dumps[:6]}"
        )
    finally:
        stderr.close()
        for s in streams:
            s.kill()
        for p in [proc.pid, *_descendants(proc.pid), *locals().get("started", [])]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _busy(port: int) -> list[subprocess.Popen]:
    """Streams decoding (and queued for KV) on every worker, for 3 s before the stop."""
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
    return streams
