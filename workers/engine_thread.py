"""The model thread of a worker process, and what every worker rank does to start.

One thread per rank-0 worker runs the engine (`EngineThread`): it owns the engine,
the block manager and (prefill) the KV sender. Other threads never touch them;
they hand work over as callables through the thread's inbox and read the
snapshot the owner publishes after every pass of its loop.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol

import ray
import torch

from transfer.backend import RayObjectBackend, TransferBackend
from wire.api import WorkerSpec
from workers.engine import Engine, StepOutput
from workers.runner import ModelRunner
from workers.tp import exit_for_restart

log = logging.getLogger("pdcluster.worker")

ORPHAN_CHECK_S = 1.0  # how often a worker checks that its raylet is still there


def _omp_max_threads() -> int | None:
    """What OpenMP (which MKL's GEMMs follow) gives the calling thread, asked of
    libgomp directly: torch's own getters reinitialise the count and would hide it."""
    with open("/proc/self/maps") as f:
        path = next((ln.split()[-1] for ln in f if "/libgomp" in ln), None)
    return ctypes.CDLL(path).omp_get_max_threads() if path else None


def model_thread_start(runner: ModelRunner, num_threads: int) -> int | None:
    """First call of the one thread that runs the model; returns OpenMP's thread
    count there. Three things found by measuring (2 cores, batch-32 decode step
    85 ms in-process, 160-195 ms in the actor before this):
    - OpenMP counts threads per thread. Ray starts workers with OMP_NUM_THREADS=1,
      so a thread other than the one that called torch.set_num_threads runs
      MKL's GEMMs on one core. The model thread sets its own count.
    - One OpenMP team per process. With a second one (the loading thread's),
      libgomp manages more threads than cores and makes its workers sleep
      between parallel regions: silu on 32 x 1536 took 53 us instead of 12.
      So loading runs on one thread (`load_runner`).
    - MKL packs weights for the packing thread's count: packed here.
    A failure here exits the process (Ray restarts it): an actor whose model
    thread is gone would accept work that nothing runs."""
    try:
        torch.set_num_threads(num_threads)
        runner.pack_weights()
        return _omp_max_threads()
    except BaseException as e:  # noqa: BLE001
        exit_for_restart("model thread set-up", e)


class EngineOwner(Protocol):
    """What the engine thread calls back, all on the engine thread."""

    engine: Engine

    def before_step(self) -> None: ...
    def on_outputs(self, outputs: list[StepOutput]) -> None: ...
    def on_tick(self) -> None: ...
    def on_error(self, exc: BaseException) -> None: ...


class EngineThread:
    """Runs `engine.step()` in a loop on a dedicated thread. Idle, or blocked on a
    full KV pool, it sleeps on its inbox: woken at once by new work or a free (both
    arrive as calls), and every `idle_wait_s` for `on_tick` (NIXL notifications,
    lease expiry, TP keep-alive). It never spins: a wake-up of an idle worker
    preempts a busy one's OpenMP thread on a shared machine."""

    def __init__(
        self,
        owner: EngineOwner,
        num_threads: int,
        idle_wait_s: float = 0.05,
        setup: Callable[[], None] | None = None,
    ):
        self.owner = owner
        self.num_threads = num_threads
        self.omp_threads: int | None = None  # as OpenMP reports it on this thread
        self._setup = setup  # runs on the thread before the first step (TP rendezvous)
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._idle_wait_s = idle_wait_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], None]) -> None:
        self._inbox.put(fn)

    def stop(self) -> None:
        self._stop.set()

    def _drain(self, block: bool) -> None:
        try:
            fn = self._inbox.get(timeout=self._idle_wait_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            fn()
            try:
                fn = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _loop(self) -> None:
        owner, engine = self.owner, self.owner.engine
        # The TP group forms first: the followers wait for it, not for this rank's
        # GEMM measurements (model_thread_start).
        if self._setup is not None:
            self._setup()  # ends the process itself when the group cannot form
        self.omp_threads = model_thread_start(engine.runner, self.num_threads)
        while not self._stop.is_set():
            try:
                self._drain(block=not engine.has_work or engine.blocked)
                owner.before_step()
                if engine.has_work:
                    owner.on_outputs(engine.step())
                owner.on_tick()
            except BaseException as e:  # noqa: BLE001 - report, never die silently
                log.exception("engine step failed")
                try:
                    owner.on_error(e)
                except BaseException as e2:  # noqa: BLE001 - a thread gone would stop serving
                    exit_for_restart("engine failure handling", e2)


def exit_when_orphaned(period_s: float = ORPHAN_CHECK_S) -> None:
    """End this process once its parent (the raylet that started it) is gone: a
    worker whose node was torn down must not go on running, let alone burn a core."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(period_s)
            if os.getppid() != parent:
                log.critical("raylet (pid %d) is gone: exiting", parent)
                logging.shutdown()
                os._exit(1)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def make_backend(spec: WorkerSpec, pool: torch.Tensor) -> TransferBackend:
    name = f"{spec.role}-{spec.replica}" + (f"-rank{spec.tp_rank}" if spec.tp_size > 1 else "")
    if spec.transfer_backend == "nixl":
        try:
            from transfer.nixl_backend import NixlTransferAgent

            return NixlTransferAgent(name, pool)
        except Exception as e:  # noqa: BLE001 - any NIXL/UCX start failure, or no nixl
            if spec.tp_size > 1:  # shards move rank to rank over NIXL only
                raise RuntimeError(f"NIXL is required at tensor_parallel_size > 1: {e!r}") from e
            log.warning("NIXL unavailable (%r): using the Ray object store for KV", e)
    return RayObjectBackend(name, pool)


def load_runner(spec: WorkerSpec) -> ModelRunner:
    # Loads on one thread: the model thread alone takes `num_threads` (see
    # model_thread_start), so the process has one OpenMP team.
    model_dir = spec.model_dir
    if not model_dir:  # on a cluster of many machines: this node's own copy
        from workers.loader import resolve_model

        model_dir = str(resolve_model(spec.model_source, spec.cache_dir))
    torch.set_num_threads(1)
    runner = ModelRunner(
        model_dir,
        max_model_len=spec.max_model_len,
        num_blocks=spec.kv_blocks,
        block_size=spec.block_size,
        dtype=spec.dtype,
        device=spec.device,
        tp_rank=spec.tp_rank,
        tp_size=spec.tp_size,
    )
    runner.gemm_cache_dir = spec.cache_dir  # the GEMM plan cache beside the models
    return runner


def ready_info(spec: WorkerSpec, agent: TransferBackend) -> dict:
    """What every rank answers once it is up (the launcher waits for all of them)."""
    return {
        "role": spec.role,
        "replica": spec.replica,
        "rank": spec.tp_rank,
        "pid": os.getpid(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "agent": agent.name,
    }
