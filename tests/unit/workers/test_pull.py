"""One pull's life on decode (`workers/pull.py`), in-process: the real `DecodeWorker`
methods, engine, engine thread and NIXL agents, against a prefill side made of the
real prefill-only engine and `KVSender` over its own NIXL agent, answering claim /
renew / release as coroutines the way Ray's handles are awaited. No Ray: seconds.
"""

from __future__ import annotations

import asyncio
import threading
import time

import msgspec
import pytest

from cluster.config import parse_config, worker_spec
from transfer.handle import LeaseExpired, TransferError, TransferTimeout
from transfer.nixl_backend import NixlTransferAgent
from transfer.sender import KVSender
from wire.api import WorkerError
from wire.sampling_params import SamplingParams
from workers.decode_worker import DecodeWorker
from workers.engine import Engine
from workers.engine_thread import EngineThread
from workers.grammar import Grammars
from workers.kv_cache import BlockManager
from workers.runner import ModelRunner
from workers.sequence import Sequence

SP = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
PROMPT = list(range(3, 40))  # 3 blocks of 16


def _decode(model_dir, loop, num_blocks=16, timeout_s=2.0) -> DecodeWorker:
    """The decode worker class without its Ray actor wrapper, built as its __init__ does."""
    w = object.__new__(DecodeWorker.__ray_metadata__.modified_class)
    cfg = parse_config(
        {  # a full-length sequence fits the pool, as the config requires
            "model": {"source": "tiny", "max_model_len": min(256, num_blocks * 16)},
            "cluster": {"address": "auto"},
            "prefill": {"kv_blocks": num_blocks},
            "decode": {"kv_blocks": num_blocks, "max_running": 4, "prefix_caching": False},
            "transfer": {"timeout_s": timeout_s},
        }
    )
    w.spec = worker_spec(cfg, "decode", 0, str(model_dir))
    w.node_id = "local"
    w.runner = ModelRunner(
        model_dir, max_model_len=w.spec.max_model_len, num_blocks=num_blocks, block_size=16
    )
    w.blocks = BlockManager(num_blocks, 16)
    w.engine = Engine(w.runner, w.blocks, max_batched_tokens=512, max_running=4, stall_after_s=30.0)
    w.agent = NixlTransferAgent("decode", w.runner.kv_pool)
    w.loop = loop
    w.tp_peers, w._followers = [], None
    w.grammars = Grammars(w.runner.model_dir, w.runner.args.vocab_size, w.runner.args.eos_token_ids)
    w._init_role()
    w.snapshot = w._engine_stats()
    w.thread = EngineThread(w, num_threads=1)
    return w


class _Call:
    """`actor.method.remote(...)`: an awaitable, and a log line."""

    def __init__(self, fn, log: list, name: str):
        self.fn, self.log, self.name = fn, log, name

    def remote(self, *args):
        self.log.append(self.name)
        return self.fn(*args)


class Prefill:
    """The prefill side: a prefill-only engine and its KV sender (leases), as the prefill
    worker's engine thread runs them, behind an actor-like face."""

    def __init__(self, model_dir, name="prefill"):
        self.runner = ModelRunner(model_dir, max_model_len=256, num_blocks=32, block_size=16)
        self.blocks = BlockManager(32, 16)
        self.engine = Engine(
            self.runner, self.blocks, max_batched_tokens=512, max_running=8, prefill_only=True
        )
        self.agent = NixlTransferAgent(name, self.runner.kv_pool)
        self.sender = KVSender(
            self.agent, self.blocks.free, max_pending=64, lease_ttl_s=30.0, claim_s=7.0
        )
        self.lock = threading.Lock()
        self.calls: list[str] = []
        self.claim = _Call(self._claim, self.calls, "claim")
        self.renew = _Call(self._renew, self.calls, "renew")
        self.release = _Call(self._release, self.calls, "release")

    def prefill(self, rid: str, prompt: list[int]):
        with self.lock:
            seq = Sequence(rid, prompt, SP)
            self.engine.add(seq)
            while True:
                for out in self.engine.step():
                    blocks, seq.block_table = seq.block_table, []
                    return out.token, self.sender.register(rid, blocks, seq.num_cached)

    async def _claim(self, rid, epoch):
        with self.lock:
            return self.sender.claim(rid, epoch)

    async def _renew(self, rid, epoch):
        with self.lock:
            return self.sender.renew(rid, epoch)

    def _release(self, rid, epoch=None):
        with self.lock:
            self.sender.release(rid, epoch)

    def leases(self) -> int:
        with self.lock:
            self.sender.tick()  # NIXL's completion notifications release leases
            return len(self.sender)


async def _channel(w: DecodeWorker, name: str = "ch"):
    """Open the router's output channel and keep reading it (tokens per request)."""
    gen = w.outputs(name)
    assert await gen.__anext__() == []
    got: dict[str, list[int]] = {}

    async def pump():
        async for step in gen:
            for rid, delta in step:
                got.setdefault(rid, []).extend(delta.tokens)

    return asyncio.ensure_future(pump()), got


async def _settled(w: DecodeWorker, prefill: Prefill) -> tuple[int, int]:
    for _ in range(50):
        await asyncio.sleep(0.1)
        if not w.blocks.num_used and not prefill.leases():
            break
    return w.blocks.num_used, prefill.leases()


def test_a_pull_is_served_and_frees_everything(tiny_model_dir):
    async def main():
        w, p = _decode(tiny_model_dir, asyncio.get_running_loop()), Prefill(tiny_model_dir)
        pump, got = await _channel(w)
        tok, handle = p.prefill("r1", PROMPT)
        assert await w.generate("r1", "ch", PROMPT, tok, SP, handle, 20.0, p) == "length"
        await asyncio.sleep(0.1)
        assert len(got["r1"]) == 3 and p.calls == ["claim"]  # NIXL's notification releases
        assert await _settled(w, p) == (0, 0)
        pump.cancel()
        w.thread.stop()

    asyncio.run(main())


def test_blocks_and_the_request_end_in_one_turn_still_release_the_lease(tiny_model_dir):
    """The engine gives the blocks and the request ends (aborted, its channel closed) in
    the same turn of the event loop: no READ starts, the blocks go back, and the
    prefill lease is released at once (before the review's fix it stayed pinned until
    its TTL ran out)."""

    async def main():
        w, p = _decode(tiny_model_dir, asyncio.get_running_loop()), Prefill(tiny_model_dir)
        pump, _ = await _channel(w)
        tok, handle = p.prefill("r1", PROMPT)
        given = w._blocks_ready

        def given_then_aborted(admitted):
            given(admitted)
            for rid, _ in admitted:  # what DecodeWorker.abort does
                w._end(rid, WorkerError(f"request {rid} aborted"))
                w.thread.call(lambda r=rid: w.engine.abort(r))

        w._blocks_ready = given_then_aborted
        with pytest.raises(WorkerError):
            await w.generate("r1", "ch", PROMPT, tok, SP, handle, 20.0, p)
        assert await _settled(w, p) == (0, 0)
        assert "claim" not in p.calls and p.calls.count("release") == 1
        pump.cancel()
        w.thread.stop()

    asyncio.run(main())


def test_a_lease_dead_in_transit_is_found_out_at_once(tiny_model_dir):
    """A handle whose lease had no time left when it reached decode (the router counts
    the hops) while decode's pool is full is renewed at once, and the dead lease is a
    LeaseExpired in well under a second (before, "0 s left" read as "no lease", and the
    first renewal came at half the request's time left)."""

    async def main():
        w = _decode(tiny_model_dir, asyncio.get_running_loop(), num_blocks=4)
        p = Prefill(tiny_model_dir)
        pump, _ = await _channel(w)
        hog = w.engine.blocks.allocate(3)  # the pool is busy
        tok, handle = p.prefill("r1", PROMPT)
        with p.lock:
            p.sender.release("r1")  # the lease is gone
        handle = msgspec.structs.replace(handle, ttl_s=0.0)
        t0 = time.monotonic()
        with pytest.raises(LeaseExpired):
            await w.generate("r1", "ch", PROMPT, tok, SP, handle, 20.0, p)
        assert time.monotonic() - t0 < 1.0 and p.calls[0] == "renew"
        w.thread.call(lambda: w.engine.blocks.free(hog))
        assert await _settled(w, p) == (0, 0)
        pump.cancel()
        w.thread.stop()

    asyncio.run(main())


def test_pulls_from_a_peer_still_connecting_leave_the_pull_threads_to_others(tiny_model_dir):
    """A prefill host that drops packets: its handshake blocks. The many pulls routed to
    it wait for that handshake on the event loop, not on the decode worker's pull
    threads, so a pull from a healthy prefill is served at once (the review filled all
    eight threads with waiters and the healthy pull timed out)."""

    async def main():
        w = _decode(tiny_model_dir, asyncio.get_running_loop(), num_blocks=64, timeout_s=3.0)
        bad, good = Prefill(tiny_model_dir, "bad"), Prefill(tiny_model_dir, "good")
        w.engine.max_running = 32
        pump, _ = await _channel(w)
        release = threading.Event()
        handshake = w.agent._agent.add_remote_agent

        def add_remote_agent(metadata):
            if metadata == bad.agent._metadata:
                release.wait(30)
            return handshake(metadata)

        w.agent._agent.add_remote_agent = add_remote_agent
        stuck = []
        for i in range(10):
            tok, handle = bad.prefill(f"b{i}", PROMPT)
            stuck.append(
                asyncio.ensure_future(w.generate(f"b{i}", "ch", PROMPT, tok, SP, handle, 20.0, bad))
            )
        await asyncio.sleep(0.3)
        tok, handle = good.prefill("g", PROMPT)
        t0 = time.monotonic()
        assert await w.generate("g", "ch", PROMPT, tok, SP, handle, 20.0, good) == "length"
        assert time.monotonic() - t0 < 1.5
        release.set()
        for result in await asyncio.gather(*stuck, return_exceptions=True):
            # Each ends: served once the handshake returned, or out of time before it.
            assert result == "length" or isinstance(result, TransferError), result
        assert await _settled(w, bad) == (0, 0) and good.leases() == 0
        pump.cancel()
        w.thread.stop()

    asyncio.run(main())


def test_a_read_given_up_in_flight_holds_its_blocks_until_its_data_cannot_land(tiny_model_dir):
    """A READ still in flight at the pull's deadline (a partition that drops packets) is a
    timeout for the router (ReadLate), but its blocks stay out of the pool, counted as used,
    until the agent says no reply can land in them any more (`late_write_s`, short here);
    then the engine thread takes them back (before, they went back at the deadline, and a
    reply retransmitted after the heal overwrote another request's KV)."""

    async def main():
        w = _decode(tiny_model_dir, asyncio.get_running_loop(), timeout_s=0.5)
        p = Prefill(tiny_model_dir)
        pump, _ = await _channel(w)
        w.agent.late_write_s = 2.0
        transfer = w.agent._agent.transfer
        w.agent._agent.transfer = lambda xfer, *a: transfer(xfer, *a) and "PROC"
        w.agent._agent.check_xfer_state = lambda xfer: "PROC"  # never seen to finish
        tok, handle = p.prefill("r1", PROMPT)
        t0 = time.monotonic()
        with pytest.raises(TransferTimeout):
            await w.generate("r1", "ch", PROMPT, tok, SP, handle, 20.0, p)
        assert w.transfer_counts["timeouts"] == 1
        assert w.blocks.num_used == 3  # held: the prompt's 3 blocks
        while w.blocks.num_used and time.monotonic() - t0 < 10:
            await asyncio.sleep(0.05)
        assert w.blocks.num_used == 0 and time.monotonic() - t0 >= 2.0
        assert w.agent.stuck_reads == 0 and not w.engine.held
        assert await _settled(w, p) == (0, 0)
        pump.cancel()
        w.thread.stop()

    asyncio.run(main())


def test_a_fork_whose_call_starts_before_its_parent_registers_waits_for_it(tiny_model_dir):
    """n > 1: choice 0's call starts first (Ray starts one caller's calls in order) but
    registers only after its own setup (a grammar compiling, a busy loop); a fork whose
    call gets there first waits for it and is forked from its KV, not refused (CI saw
    such a choice prefilled and pulled again; this test failed before the wait)."""

    async def main():
        w, p = _decode(tiny_model_dir, asyncio.get_running_loop()), Prefill(tiny_model_dir)
        pump, got = await _channel(w)
        tok, handle = p.prefill("r1", PROMPT)
        setup = w.sequence

        async def sequence(rid, *args):
            if rid == "r1":
                await asyncio.sleep(0.3)
            return await setup(rid, *args)

        w.sequence = sequence
        parent = asyncio.ensure_future(w.generate("r1", "ch", PROMPT, tok, SP, handle, 20.0, p))
        await asyncio.sleep(0)  # the parent's call has started
        fork = asyncio.ensure_future(w.generate_fork("r1-f", "ch", "r1", PROMPT, SP, 20.0))
        assert await fork == "length" and await parent == "length"
        assert len(got["r1"]) == 3 and len(got["r1-f"]) == 4  # its first token made here
        assert p.calls == ["claim"] and await _settled(w, p) == (0, 0)
        assert not w._arriving
        pump.cancel()
        w.thread.stop()

    asyncio.run(main())


def test_an_abort_while_the_grammar_compiles_is_not_lost(tiny_model_dir):
    """A request with a format compiles its grammar before it registers on decode; the
    router's abort in that window finds nothing to end, so without a record of it the
    request would decode afterwards, holding blocks and a batch place, with nobody
    reading (a cold review reproduced it; this test failed before the fix)."""
    import llguidance

    async def main():
        w = _decode(tiny_model_dir, asyncio.get_running_loop())
        pump, got = await _channel(w)
        entered, gate, compile_ = asyncio.Event(), asyncio.Event(), w.grammars.matcher

        async def slow(grammar):
            entered.set()
            await gate.wait()
            return await compile_(grammar)

        w.grammars.matcher = slow
        sp = msgspec.structs.replace(
            SP, ignore_eos=False, grammar=llguidance.grammar_from("regex", "a{2}")
        )
        run = asyncio.ensure_future(w.generate_local("r1", "ch", PROMPT, sp, 20.0))
        await asyncio.wait_for(entered.wait(), 10)
        await w.abort("r1")
        gate.set()
        with pytest.raises(WorkerError, match="aborted"):
            await asyncio.wait_for(run, 10)
        await asyncio.sleep(0.2)
        assert "r1" not in w._streams and not w.engine.seqs and w.blocks.num_used == 0
        assert "r1" not in got and not w._compiling
        # The same request id may come again (a retry) and is served.
        assert await w.generate_local("r1", "ch", PROMPT, sp, 20.0) == "stop"
        pump.cancel()
        w.thread.stop()

    asyncio.run(main())
