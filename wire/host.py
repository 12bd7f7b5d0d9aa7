"""This host: its CPU model (as reports record it), a process's usage, and where
pdcluster keeps its model cache."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_model() -> str:
    """This machine's CPU model and core count, as benchmark and chaos reports and the
    GEMM plan cache record them."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    import platform

    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def process_usage() -> dict:
    """This process's resident memory and open file descriptors (chaos soak tracks both)."""
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux
        rss = fds = 0
    return {"pid": os.getpid(), "rss_bytes": rss, "open_fds": fds}


def cache_dir() -> Path:
    """$PDCLUSTER_CACHE if set, else ~/.cache/pdcluster."""
    env = os.environ.get("PDCLUSTER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pdcluster"
