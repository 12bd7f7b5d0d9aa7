"""Rank r >= 1 of a tensor-parallel group (the follower). Like the other worker
actor modules it imports torch only where it runs (see `workers/leader.py`)."""

from __future__ import annotations

import logging
import threading
import time

import ray

from transfer.handle import RankKV
from wire.api import RankStats, WorkerSpec

log = logging.getLogger("pdcluster.tp")


@ray.remote
class RankWorker:
    """Rank r >= 1 of a tensor-parallel group: its shard of the weights and KV
    pool. It runs every plan the leader broadcasts and, on decode, READs its
    shard of a prompt's KV from the same rank of the prefill group."""

    def __init__(self, spec: WorkerSpec):
        from workers.engine_thread import exit_when_orphaned, load_runner, make_backend
        from workers.tp import TPGroup

        exit_when_orphaned()
        self.spec = spec
        self.runner = load_runner(spec)
        self.agent = make_backend(spec, self.runner.kv_pool)
        self.steps = 0
        self.omp_threads: int | None = None
        tp = self.runner.tp = TPGroup(spec.tp_rank, spec.tp_size, self.runner.device)
        try:
            tp.join(leader_store(ray.get_actor(spec.rank_name(0)), tp))
            tp.gather(self.agent.rank_kv([]))
        except Exception as e:  # noqa: BLE001 - exit, so Ray restarts us to try again
            tp.failed(e)
        threading.Thread(target=self._follow, name="tp-follow", daemon=True).start()

    def _follow(self) -> None:
        from workers.engine_thread import model_thread_start

        self.omp_threads = model_thread_start(self.runner, self.spec.num_threads)
        while True:
            plan = self.runner.tp.recv()
            if plan is not None:
                self.runner.run(plan)
                self.steps += 1

    def pull(self, src: RankKV, blocks: list[int], deadline: float) -> int:
        """READ rank r's shard into `blocks` by `deadline` (time.monotonic(), set by the
        leader on this node: one clock for every process of a node): a call that starts
        after it reads nothing (TransferTimeout). The leader holds the blocks until this
        call answers: a READ given up in flight (ReadLate) answers only once its data can
        no longer land. A READ NIXL will not release ends this process: the leader frees
        these block ids on every rank, and only a new process is sure nothing writes
        them any more."""
        from transfer.handle import ReadLate, ReadStuck, TransferTimeout
        from workers.tp import exit_for_restart

        try:
            return self.agent.pull(src, blocks, timeout_s=deadline - time.monotonic())
        except ReadLate as e:  # one of this actor's threads (max_concurrency) waits
            time.sleep(max(0.0, e.until - time.monotonic()))
            self.agent.release_stuck()
            raise TransferTimeout(str(e)) from None
        except ReadStuck as e:
            exit_for_restart("a KV READ NIXL would not release", e)

    def ready(self) -> dict:
        from workers.engine_thread import ready_info

        return ready_info(self.spec, self.agent)

    def stats(self) -> RankStats:
        return RankStats(rank=self.spec.tp_rank, steps=self.steps, omp_threads=self.omp_threads)


def leader_store(leader, tp) -> tuple[str, int, str]:
    """The rendezvous address of `leader` (rank 0's actor), once `tp` is connected to its
    store. An address whose store is gone came from a leader that ended after answering
    (the group restarts as a unit, and a follower back first can ask the old leader):
    asked again, the restarted leader answers. Waiting out a gone store instead (60 s)
    would outlast the new leader's wait for this rank (30 s), and the two would keep
    restarting out of step."""
    from workers.tp import RENDEZVOUS_TIMEOUT_S

    deadline = time.monotonic() + RENDEZVOUS_TIMEOUT_S
    while True:
        address = ray.get(leader.tp_address.remote(), timeout=RENDEZVOUS_TIMEOUT_S)
        try:
            tp.connect(address)
            return address
        except Exception:  # noqa: BLE001 - a gone or formed group: ask again, in the bound
            if time.monotonic() > deadline:
                raise
            log.warning("rank %d: leader at %s gone or formed; asking again", tp.rank, address)
            time.sleep(0.5)
