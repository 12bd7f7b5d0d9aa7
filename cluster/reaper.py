"""The last line of a clean stop: a small process that outlives `pdcluster up` and
kills whatever Ray processes of its local cluster are still there.

The launcher starts it for `cluster.address: local` with a pipe on its stdin. It
records, every `SCAN_S`, the Ray processes below the launcher's process (raylets,
GCS, agents, workers). When the pipe closes (a clean shutdown has finished, or the
launcher died: SIGTERM to its whole process group kills the GCS under a driver that
then aborts, and orphans the raylets' agents), it sends SIGTERM to every recorded
process still alive (with the same start time, so a reused pid is never touched),
then SIGKILL after `GRACE_S`. It runs in its own session and ignores SIGINT and
SIGTERM, so the signal that stops the cluster does not stop it first.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

SCAN_S = 0.5
GRACE_S = 2.0
_RAY = ("raylet", "gcs_server", "ray::", "ray/_private", "ray/dashboard", "ray/autoscaler")


def proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] == "Z" else (int(fields[1]), int(fields[19]))


def _ray_descendants(root: int) -> dict[int, int]:
    """pid -> start time of every Ray process below `root`."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit() and (st := proc_stat(int(d))) is not None:
            children.setdefault(st[0], []).append(int(d))
            starts[int(d)] = st[1]
    found, todo = {}, [root]
    while todo:
        for c in children.get(todo.pop(), []):
            todo.append(c)
            try:
                with open(f"/proc/{c}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except (FileNotFoundError, ProcessLookupError):
                continue
            if any(k in cmd for k in _RAY):
                found[c] = starts[c]
    return found


def _signal_alive(seen: dict[int, int], sig: int) -> int:
    n = 0
    for pid, start in seen.items():
        st = proc_stat(pid)
        if st is not None and st[1] == start:
            try:
                os.kill(pid, sig)
                n += 1
            except ProcessLookupError:
                pass
    return n


def main() -> int:
    root = int(sys.argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    seen: dict[int, int] = {}
    while True:
        seen.update(_ray_descendants(root))
        ready, _, _ = select.select([sys.stdin], [], [], SCAN_S)
        if ready and not os.read(sys.stdin.fileno(), 4096):  # EOF: launcher done or dead
            break
    # What started since the last scan (a stop during start-up), while the launcher lives.
    seen.update(_ray_descendants(root))
    if _signal_alive(seen, signal.SIGTERM):
        deadline = time.monotonic() + GRACE_S
        while time.monotonic() < deadline and any(
            (st := proc_stat(p)) is not None and st[1] == s for p, s in seen.items()
        ):
            time.sleep(0.1)
        _signal_alive(seen, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
