"""The node agent: a Ray actor placed on one node that sends signals to processes
there. Faults go through it so that they work on any Ray cluster (local nodes, VMs,
pods), not only where the harness runs. A node's processes are its raylet and
everything under it (workers, agents); the agent itself is one of them and spares
itself until the last.

A stall never depends on the agent living to its end: before the SIGSTOP, a small
process of its own session (so a signal to the agent's group does not reach it, and
it is not among the stopped) is started to send the SIGCONT at the stall's end.

`kill` and `stall` signal only processes of this node's raylet tree: their pids come
from callers (the kill-router target from `/debug/state`, which any client can read),
and 0 or -1 would signal a process group or every process of the user."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import psutil
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=4)
class NodeAgent:
    def __init__(self):
        self.raylet = psutil.Process(os.getppid())

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def node_processes(self) -> list[int]:
        """The raylet and every process under it, but this agent."""
        kids = self.raylet.children(recursive=True)
        return [self.raylet.pid] + [p.pid for p in kids if p.pid != os.getpid()]

    def _ours(self, pids: list[int]) -> list[int]:
        """The pids that are processes of this node's raylet tree (the raylet or below
        it); ValueError, and nothing signalled, for any other live process and for pid 1
        or less. A pid no longer there is left out (the caller learns it missed)."""
        ours = {self.raylet.pid} | {p.pid for p in self.raylet.children(recursive=True)}
        others = [
            p
            for p in pids
            if type(p) is not int or p <= 1 or (p not in ours and psutil.pid_exists(p))
        ]
        if others:
            raise ValueError(f"not processes of this node's Ray raylet tree: {others}")
        return [p for p in pids if p in ours]

    def ray_cpu_s(self) -> dict[int, tuple[str, float]]:
        """pid -> (name, CPU seconds so far) of Ray's own processes on this node: the
        raylet, the agents it started, and the processes of this Ray session that no
        raylet started (on the head: the GCS, dashboard, autoscaler and log monitors).
        Workers (every actor, the router's too) are left out."""
        session = _SESSION.search(" ".join(self.raylet.cmdline())).group(0)
        procs = [self.raylet]
        procs += [p for p in self.raylet.children() if _name(p).startswith(_AGENTS)]
        for p in psutil.process_iter():
            try:
                cmd = " ".join(p.cmdline())
            except psutil.Error:
                continue
            # Other nodes' raylets carry the session too; a worker still starting too.
            if session in cmd and not any(k in cmd for k in ("raylet/raylet", "_worker.py")):
                procs.append(p)
        out = {}
        for p in procs:
            try:
                t = p.cpu_times()
                out[p.pid] = (_name(p), t.user + t.system)
            except psutil.Error:
                pass
        return out

    def kill(self, pids: list[int]) -> int:
        """SIGKILL; how many of the pids were there to kill."""
        return _signal(self._ours(pids), signal.SIGKILL)

    def stall(self, pids: list[int], seconds: float) -> int:
        """SIGSTOP, wait, SIGCONT; how many of the pids were stopped."""
        return self._stall(self._ours(pids), seconds)

    def _stall(self, pids: list[int], seconds: float) -> int:
        if not pids:
            return 0
        resume = subprocess.Popen(
            ["/bin/sh", "-c", f"sleep {seconds:.3f}; kill -CONT {' '.join(map(str, pids))}"],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            stopped = _signal(pids, signal.SIGSTOP)
            time.sleep(seconds)
        finally:
            _signal(pids, signal.SIGCONT)
            resume.wait(5)
        return stopped

    def stall_node(self, seconds: float) -> int:
        return self._stall(self.node_processes(), seconds)  # the tree itself: nothing to refuse

    def kill_node(self) -> None:
        """Everything on this node, raylet first, then this agent (no answer comes)."""
        _signal(self.node_processes(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


_SESSION = re.compile(r"session_\d{4}-\d\d-\d\d_[\d-]+_\d+_\d+")  # Ray's session name
_AGENTS = ("DashboardAgent", "RuntimeEnvAgent", "agent.py", "main.py")  # before setproctitle


def _name(p: psutil.Process) -> str:
    """`gcs_server`, `raylet`, `DashboardAgent` (a retitled `ray::` process), `monitor.py`."""
    try:
        cmd = p.cmdline()
    except psutil.Error:
        return "?"
    if not cmd:
        return "?"
    if cmd[0].startswith("ray::"):
        return cmd[0][5:].split()[0]
    script = next((os.path.basename(a) for a in cmd[1:] if a.endswith(".py")), None)
    return script or os.path.basename(cmd[0])


def _signal(pids: list[int], sig: int) -> int:
    """Send `sig` to each pid; how many got it (gone or not ours: skipped)."""
    n = 0
    for pid in pids:
        try:
            os.kill(pid, sig)
            n += 1
        except OSError:  # gone already (a watchdog or Ray killed it), or not ours
            pass
    return n


def start_agent(node_id: str):
    return NodeAgent.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
    ).remote()
