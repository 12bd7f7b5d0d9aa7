"""The node agent: a Ray actor placed on one node that sends signals to processes
there. Faults go through it so that they work on any Ray cluster (local nodes, VMs,
pods), not only where the harness runs. A node's processes are its raylet and
everything under it (workers, agents); the agent itself is one of them and spares
itself until the last."""

from __future__ import annotations

import os
import signal
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

    def kill(self, pids: list[int]) -> float:
        t = time.time()
        _signal(pids, signal.SIGKILL)
        return t

    def stall(self, pids: list[int], seconds: float) -> tuple[float, float]:
        """SIGSTOP, wait, SIGCONT; the times of the stop and the continue."""
        t0 = time.time()
        _signal(pids, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            _signal(pids, signal.SIGCONT)
        return t0, time.time()

    def stall_node(self, seconds: float) -> tuple[float, float]:
        return self.stall(self.node_processes(), seconds)

    def kill_node(self) -> None:
        """Everything on this node, raylet first, then this agent (no answer comes)."""
        _signal(self.node_processes(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass  # gone already (a watchdog or Ray killed it)


def start_agent(node_id: str):
    return NodeAgent.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
    ).remote()
