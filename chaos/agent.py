"""The node agent: a Ray actor placed on one node that sends signals to processes
there. Faults go through it so that they work on any Ray cluster (local nodes, VMs,
pods), not only where the harness runs. A node's processes are its raylet and
everything under it (workers, agents); the agent itself is one of them and spares
itself until the last.

A stall never depends on the agent living to its end: before the SIGSTOP, a small
process of its own session (so a signal to the agent's group does not reach it, and
it is not among the stopped) is started to send the SIGCONT at the stall's end."""

from __future__ import annotations

import os
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

    def kill(self, pids: list[int]) -> int:
        """SIGKILL; how many of the pids were there to kill."""
        return _signal(pids, signal.SIGKILL)

    def stall(self, pids: list[int], seconds: float) -> int:
        """SIGSTOP, wait, SIGCONT; how many of the pids were stopped."""
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
        return self.stall(self.node_processes(), seconds)

    def kill_node(self) -> None:
        """Everything on this node, raylet first, then this agent (no answer comes)."""
        _signal(self.node_processes(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


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
