"""The prefill worker: runs prompts, samples the first token, and pins the
prompt's KV blocks under a lease (`transfer.sender.KVSender`) until decode has
pulled them or the lease expires."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import ray

from transfer.handle import TransferBackpressure
from wire.api import (
    EngineStats,
    PrefillResult,
    PrefillStats,
    RequestReleased,
    SequenceFailed,
    WorkerError,
)
from wire.sampling_params import SamplingParams
from workers.leader import GroupLeader

if TYPE_CHECKING:
    from workers.engine import StepOutput


def _result(out: StepOutput, handle=None) -> PrefillResult:
    seq = out.seq
    return PrefillResult(
        seq.request_id,
        out.token,
        out.finish_reason,
        handle,
        queued_s=seq.queued_s or 0.0,  # before it was first scheduled
        cached_tokens=seq.cached_tokens,  # prompt tokens found in the prefix cache
        logprobs=out.logprobs,
        prompt_logprobs=out.prompt_logprobs,
    )


@ray.remote
class PrefillWorker(GroupLeader):
    """Runs prompts, samples the first token, pins the prompt's KV under a lease."""

    def _init_role(self) -> None:
        from transfer.sender import KVSender

        spec = self.spec
        # Prefill calls not answered yet (event loop); every exit resolves its caller.
        self._futures: dict[str, asyncio.Future] = {}
        # A claimed lease stays pinned for the longest a read can take.
        self.sender = KVSender(
            self.agent,
            self.blocks.free,
            max_pending=spec.max_pending,
            lease_ttl_s=spec.lease_ttl_s,
            claim_s=spec.transfer_timeout_s + 5.0,
            describe=self.rank_kvs,
            faults=self.fault_injector(spec.faults),
        )

    # ---- API (event loop) -----------------------------------------------------

    async def prefill(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        output_ids: list[int] | None = None,
    ) -> PrefillResult:
        """Compute the prompt (and `output_ids`, the tokens the request produced before,
        when it migrates) and sample its next token. Raises TransferBackpressure at
        `max_pending` (calls pending + leases held), RequestReleased when the router
        lets go first, SequenceFailed when this request alone cannot be computed."""
        if len(self._futures) + self.snapshot.leases >= self.spec.max_pending:
            raise TransferBackpressure(
                f"prefill-{self.spec.replica}: {self.spec.max_pending} "
                "requests and leases pending (max_pending); try later"
            )
        if request_id in self._futures:
            raise WorkerError(f"request {request_id} is already being prefilled here")
        fut = self._futures[request_id] = self.loop.create_future()
        try:
            seq = await self.sequence(request_id, prompt_ids, params, output_ids)
            if not fut.done():  # not released while its grammar compiled
                self.thread.call(lambda: self._add(seq))
            return await fut
        except BaseException:
            # Cancelled, released or failed: whatever this request holds goes back.
            self.thread.call(lambda: self._release(request_id))
            raise
        finally:
            if self._futures.get(request_id) is fut:
                del self._futures[request_id]

    async def release(self, request_id: str, epoch: int | None = None) -> None:
        """Drop a request's lease (that epoch's, if given) or queued prefill: decode
        after a pull without notification, or the router's backstop. A prefill call
        still waiting for this request is answered now (RequestReleased)."""
        fut = self._futures.get(request_id)
        if epoch is None and fut is not None and not fut.done():
            fut.set_exception(RequestReleased(f"request {request_id} released while queued"))
        self.thread.call(lambda: self._release(request_id, epoch))

    async def claim(self, request_id: str, epoch: int) -> list[int]:
        """Decode asks before it reads: is (request, epoch) still live? Holds the
        lease for one read; raises LeaseExpired otherwise."""
        return await self.on_thread(lambda: self.sender.claim(request_id, epoch))

    async def renew(self, request_id: str, epoch: int) -> float:
        """Decode holds the handle but waits for free blocks: keep the lease a full
        TTL from now. Returns the seconds it has left; raises LeaseExpired."""
        return await self.on_thread(lambda: self.sender.renew(request_id, epoch))

    def _set_faults(self, injector) -> None:
        self.sender.faults = injector

    def stats(self) -> PrefillStats:
        return self._stats(PrefillStats, pending=len(self._futures))

    # ---- event loop ---------------------------------------------------------

    def _deliver(self, results: list[tuple[str, PrefillResult | BaseException]]) -> None:
        for rid, res in results:
            fut = self._futures.get(rid)
            if fut is not None and not fut.done():
                (fut.set_exception if isinstance(res, BaseException) else fut.set_result)(res)
            elif isinstance(res, PrefillResult) and res.handle is not None:
                # Nobody waits for it any more (released, cancelled): unpin it now.
                epoch = res.handle.epoch
                self.thread.call(lambda r=rid, e=epoch: self.sender.release(r, e))

    def _refused(self, request_id: str, exc: Exception) -> None:
        self._deliver([(request_id, WorkerError(str(exc)))])

    # ---- engine thread ------------------------------------------------------

    def _release(self, request_id: str, epoch: int | None = None) -> None:
        if epoch is None:
            self.engine.abort(request_id)
        self.sender.release(request_id, epoch)

    def on_outputs(self, outputs: list[StepOutput]) -> None:
        results: list[tuple[str, PrefillResult | BaseException]] = []
        for out in outputs:
            seq, rid = out.seq, out.seq.request_id
            if out.error is not None:
                results.append((rid, SequenceFailed(str(out.error), out.error.status)))
            elif out.finish_reason is not None:  # ended at its first token; blocks freed
                results.append((rid, _result(out)))
            else:  # its blocks go to the sender, which frees them in every case
                blocks, seq.block_table = seq.block_table, []
                try:
                    handle = self.sender.register(rid, blocks, seq.num_cached)
                except TransferBackpressure as e:
                    results.append((rid, e))
                    continue
                results.append((rid, _result(out, handle)))
        if results:  # one wake-up of the event loop per step
            self.loop.call_soon_threadsafe(self._deliver, results)

    def on_tick(self) -> None:
        self.sender.tick()
        super().on_tick()

    def _engine_stats(self, **role) -> EngineStats:
        return super()._engine_stats(
            leases=len(self.sender), leases_expired=self.sender.expired_total
        )

    def on_error(self, exc: BaseException) -> None:
        err = WorkerError(f"prefill engine failed: {type(exc).__name__}")
        failed = [(s.request_id, err) for s in self.engine.fail_all()]
        self.loop.call_soon_threadsafe(self._deliver, failed)
