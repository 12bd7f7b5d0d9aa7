"""Tensor parallelism below Ray: two processes over gloo, rank 0 running the
engine and broadcasting step plans, rank 1 following on its shard. Greedy
output must equal Hugging Face (TP=1) token for token, with batching, chunked
prefill and preemption exercised on the way."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from tests.unit.workers.test_engine import N, prompts_and_refs  # noqa: F401 - fixture
from workers.tp import TPGroup


def _rank(rank: int, size: int, address, model_dir: str, prompts, out) -> None:
    torch.set_num_threads(1)
    from tests.unit.workers.test_engine import run_all
    from workers.engine import Engine
    from workers.kv_cache import BlockManager
    from workers.runner import ModelRunner

    # A pool of 12 blocks for 5 prompts up to 150 tokens: preemption happens.
    runner = ModelRunner(
        model_dir, max_model_len=512, num_blocks=12, block_size=16, tp_rank=rank, tp_size=size
    )
    runner.tp = TPGroup(rank, size, runner.device)
    runner.tp.join(address)
    if rank == 0:
        engine = Engine(runner, BlockManager(12, 16), max_batched_tokens=40, max_running=8)
        seqs = run_all(engine, prompts)
        out.put(([s.output_ids for s in seqs], engine.blocks.num_used, engine.steps))
        runner.tp.send(None)  # the follower must still be in step: one more collective
    else:
        steps = 0
        while True:
            plan = runner.tp.recv()
            if plan is not None:
                runner.run(plan)
                steps += 1
            out.put(steps)


def test_tp2_engine_greedy_equals_hf(tiny_model_dir, prompts_and_refs):  # noqa: F811
    prompts, refs = prompts_and_refs
    store = TPGroup(0, 2, torch.device("cpu"))
    address = store.open("127.0.0.1")
    ctx = mp.get_context("spawn")
    out0, out1 = ctx.Queue(), ctx.Queue()
    procs = [
        ctx.Process(
            target=_rank, args=(r, 2, address, str(tiny_model_dir), prompts, q), daemon=True
        )
        for r, q in ((0, out0), (1, out1))
    ]
    for p in procs:
        p.start()
    try:
        outputs, used, steps = out0.get(timeout=120)
        follower_steps = 0
        while follower_steps < steps:  # the follower ran every one of the leader's forwards
            follower_steps = out1.get(timeout=30)
    finally:
        for p in procs:
            p.kill()
            p.join(10)
    assert outputs == refs
    assert used == 0
    assert follower_steps == steps


def test_heads_must_divide(tiny_model_dir):
    from workers.runner import ModelRunner

    with pytest.raises(ValueError, match="tensor_parallel_size 3 must divide"):
        ModelRunner(
            tiny_model_dir, max_model_len=64, num_blocks=8, block_size=16, tp_rank=0, tp_size=3
        )
