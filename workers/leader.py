"""Rank 0 of a worker group: the engine, its model thread and the group's API.

State ownership, the rule every worker follows:
- the engine thread (`EngineThread`) owns the engine, the block manager and, on
  prefill, the KV sender (leases); nothing else reads or writes them;
- the actor's event loop owns the per-call tables (pending prefill calls, decode
  streams and output channels, transfer counters);
- they talk only by message: the loop hands the engine thread callables
  (`thread.call`), the engine thread hands the loop results
  (`loop.call_soon_threadsafe`), and after every pass of its loop the engine
  thread publishes an immutable `EngineStats` snapshot, which is all `stats()`
  ever reads of engine state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec
import ray

from transfer.faults import FaultConfig, FaultInjector
from transfer.handle import RankKV
from wire.api import EngineStats, SequenceFailed, WorkerSpec
from wire.host import process_usage
from wire.sampling_params import SamplingParams
from workers.sequence import Sequence

if TYPE_CHECKING:
    from workers.engine import StepOutput

# The worker actor modules (this one, prefill_worker, decode_worker, rank_worker) import
# torch, nixl and the engine only inside the methods that run in the worker: the router
# holds these actors' handles, Ray imports an actor's class module to build a handle,
# and the router process must load neither torch nor nixl.

# A call handed to the engine thread waits at most one step for its turn.
ON_THREAD_TIMEOUT_S = 30.0


class GroupLeader:
    """The common part of `PrefillWorker` and `DecodeWorker`. At
    tensor_parallel_size > 1 it leads ranks 1.. (`RankWorker`) in lockstep."""

    def __init__(self, spec: WorkerSpec):
        from workers.engine import Engine
        from workers.engine_thread import (
            EngineThread,
            exit_when_orphaned,
            load_runner,
            make_backend,
        )
        from workers.grammar import Grammars
        from workers.kv_cache import BlockManager
        from workers.tp import TPGroup

        exit_when_orphaned()
        self.spec = spec
        self.node_id = ray.get_runtime_context().get_node_id()
        self.runner = load_runner(spec)
        self.blocks = BlockManager(spec.kv_blocks, spec.block_size, spec.prefix_caching)
        self.agent = make_backend(spec, self.runner.kv_pool)
        # Decode blocked with nothing running, past the longest a pull (claim + READ) and
        # its grace, or a READ given up in flight, can hold blocks: stalled. Prefill's
        # blocks wait on leases, which expire by themselves.
        hold_s = max(2 * spec.transfer_timeout_s, spec.transfer_timeout_s + self.agent.late_write_s)
        self.engine = Engine(
            self.runner,
            self.blocks,
            max_batched_tokens=spec.max_batched_tokens,
            max_running=spec.max_running,
            prefill_only=spec.role == "prefill",
            stall_after_s=hold_s + 10.0 if spec.role == "decode" else None,
        )
        args = self.runner.args
        self.grammars = Grammars(self.runner.model_dir, args.vocab_size, args.eos_token_ids)
        self.grammars.warm()
        self.loop = asyncio.get_event_loop()
        # Ranks 1..: their KV described with no blocks (filled per handle), their actors.
        self.tp_peers: list[RankKV] = []
        self._followers: list | None = None
        setup = None
        if spec.tp_size > 1:
            self.runner.tp = TPGroup(0, spec.tp_size, self.runner.device)
            self._tp_address = self.runner.tp.open(ray.util.get_node_ip_address())
            setup = self._form_group
        self._init_role()
        self.snapshot = self._engine_stats()  # no other thread yet: safe to build here
        self.thread = EngineThread(self, num_threads=spec.num_threads, setup=setup)

    async def sequence(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        output_ids: list[int] | None = None,
    ) -> Sequence:
        """A request's sequence for this engine, its grammar's matcher compiled (off
        this event loop and the model thread). SequenceFailed (400) when it cannot be."""
        seq = Sequence(request_id, prompt_ids, params, output_ids)
        if params.grammar is not None:
            from workers.grammar import GrammarError

            try:
                seq.matcher = await self.grammars.matcher(params.grammar)
            except GrammarError as e:
                raise SequenceFailed(f"the requested format cannot be compiled: {e}", 400) from None
        return seq

    def _init_role(self) -> None:
        """Role state that the engine thread's callbacks use; made before it starts."""

    def _form_group(self) -> None:  # engine thread, before the first step
        tp = self.runner.tp
        try:
            tp.join(self._tp_address)
            self.tp_peers = tp.gather(self.agent.rank_kv([]))[1:]
        except Exception as e:  # noqa: BLE001 - the followers retry against our next start
            tp.failed(e)

    def tp_address(self) -> tuple[str, int, str]:
        """Where ranks 1.. find this group's rendezvous (this incarnation's)."""
        return self._tp_address

    def followers(self) -> list:
        if self._followers is None:
            self._followers = [
                ray.get_actor(self.spec.rank_name(r)) for r in range(1, self.spec.tp_size)
            ]
        return self._followers

    def rank_kvs(self, block_ids: list[int]) -> list[RankKV]:
        """Every rank's share of these blocks (same block ids on every rank)."""
        return [self.agent.rank_kv(block_ids)] + [
            msgspec.structs.replace(t, block_ids=list(block_ids)) for t in self.tp_peers
        ]

    def ready(self) -> dict:
        from workers.engine_thread import ready_info

        return ready_info(self.spec, self.agent)

    def fault_injector(self, faults: FaultConfig | None) -> FaultInjector | None:
        return FaultInjector(faults, f"{self.spec.role}-{self.spec.replica}") if faults else None

    def set_faults(self, faults: FaultConfig | None) -> None:
        """Chaos: replace this replica's transfer fault hooks (None removes them). They
        last until the worker restarts, which brings back the config's `transfer.faults`."""
        self._set_faults(self.fault_injector(faults))

    def _set_faults(self, injector: FaultInjector | None) -> None:
        raise NotImplementedError

    # ---- engine thread ---------------------------------------------------

    def _add(
        self, seq: Sequence, pulled: bool = False, fork_of: str | None = None
    ) -> None:  # engine thread
        """Hand a sequence to the engine (`fork_of`: to fork from that pulled request's
        KV); a refusal fails that request alone."""
        try:
            if fork_of is not None:
                self.engine.add_fork(seq, fork_of)
            else:
                (self.engine.add_pulled if pulled else self.engine.add)(seq)
        except ValueError as e:
            self.loop.call_soon_threadsafe(self._refused, seq.request_id, e)

    def _refused(self, request_id: str, exc: Exception) -> None:  # event loop
        raise NotImplementedError

    def _stats(self, kind: type, **role):
        """This group's `stats()` answer: what both roles report, then `role`'s own."""
        return kind(
            role=self.spec.role,
            replica=self.spec.replica,
            **process_usage(),
            node_id=self.node_id,
            engine=self.snapshot,
            omp_threads=self.thread.omp_threads,
            gemm=self.runner.gemm_plan,
            **role,
        )

    def _engine_stats(self, **role) -> EngineStats:  # engine thread
        e = self.engine
        return EngineStats(
            steps=e.steps,
            running=len(e.running),
            waiting=len(e.waiting),
            waiting_for_blocks=len(e.kv_waiting),
            queued_tokens=e.num_queued_tokens,
            blocked=e.blocked,
            used_blocks=self.blocks.num_used,
            free_blocks=self.blocks.num_free,
            cached_blocks=self.blocks.num_cached,
            prefix_queried_tokens=e.prefix_queried_tokens,
            prefix_hit_tokens=e.prefix_hit_tokens,
            preemptions=e.preemptions,
            held_blocks=e.held_blocks,
            fault=e.fault,
            **role,
        )

    def before_step(self) -> None:
        pass

    def on_outputs(self, outputs: list[StepOutput]) -> None:
        raise NotImplementedError

    def on_tick(self) -> None:  # engine thread, after every pass
        if self.runner.tp is not None:
            self.runner.tp.keepalive()
        self.snapshot = self._engine_stats()

    def on_error(self, exc: BaseException) -> None:
        raise NotImplementedError

    async def on_thread(self, fn: Callable[[], object]) -> object:
        """Run `fn` on the engine thread and await its result."""
        fut = self.loop.create_future()

        def settle(ok: bool, value) -> None:  # event loop
            if not fut.done():
                (fut.set_result if ok else fut.set_exception)(value)

        def run() -> None:
            try:
                res = fn()
            except Exception as e:  # noqa: BLE001 - the caller's error, not the engine's
                self.loop.call_soon_threadsafe(settle, False, e)
                return
            self.loop.call_soon_threadsafe(settle, True, res)

        self.thread.call(run)
        return await asyncio.wait_for(fut, timeout=ON_THREAD_TIMEOUT_S)
