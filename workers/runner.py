"""Model runner: loads one rank's shard of the model, owns its KV pool, and
runs one batched forward over a list of sequences."""

from __future__ import annotations

import ctypes
import functools
import sys
from pathlib import Path

import torch

from workers.kv_cache import allocate_pool
from workers.model import AttnContext, LlamaModel, ModelArgs
from workers.sequence import Sequence
from workers.tp import StepPlan, TPGroup

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@functools.cache
def keep_freed_memory() -> None:
    """Stop glibc from returning each freed activation to the OS: by default
    every tensor over the mmap threshold is a fresh mmap, so every op on it
    pays page faults (about 2x on prefill-sized element-wise ops). Process-wide."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


class ModelRunner:
    def __init__(
        self,
        model_dir: str | Path,
        *,
        max_model_len: int,
        num_blocks: int,
        block_size: int,
        dtype: str = "float32",
        device: str = "cpu",
        tp_rank: int = 0,
        tp_size: int = 1,
    ):
        keep_freed_memory()
        self.args = ModelArgs.from_hf_dir(model_dir)
        self.model_dir = str(model_dir)  # the tokenizer's too (structured output)
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.device = torch.device(device)
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.tp: TPGroup | None = None  # set once the group has formed (tp_size > 1)
        if self.args.num_heads % tp_size or self.args.num_kv_heads % tp_size:
            raise ValueError(
                f"tensor_parallel_size {tp_size} must divide the model's "
                f"{self.args.num_heads} attention heads and "
                f"{self.args.num_kv_heads} KV heads"
            )
        torch_dtype = DTYPES[dtype]
        with torch.device(self.device):
            self.model = LlamaModel(self.args, max_model_len, tp_rank, tp_size).to(torch_dtype)
        self.model.load_hf_weights(model_dir)
        self.model.eval()
        self.gemm_plan: dict[str, list[str]] | None = None  # weight shape -> path per bucket
        self.gemm_cache_dir: str | None = None  # where GEMM plans are cached (model cache)
        self.kv_pool = allocate_pool(
            num_blocks,
            self.args.num_layers,
            block_size,
            self.model.kv_heads_local,
            self.args.head_dim,
            torch_dtype,
            self.device,
        )
        self._gather_out = torch.empty(0, dtype=torch_dtype, device=self.device)  # see AttnContext

    def plan(
        self,
        seqs: list[Sequence],
        num_new: list[int],
        every: list[int],
        copies: list[tuple[int, int]] | None = None,
    ) -> StepPlan:
        """The step as plain lists: what rank 0 broadcasts to the other ranks."""
        bs = self.block_size
        starts = [s.num_cached for s in seqs]
        nblk = -(-max(st + n for st, n in zip(starts, num_new)) // bs)
        return StepPlan(
            tokens=[s.token_ids[st : st + n] for s, st, n in zip(seqs, starts, num_new)],
            starts=starts,
            tables=[s.block_table[:nblk] for s in seqs],
            every=every,
            copies=copies or [],
        )

    def _context(self, plan: StepPlan):
        """Flatten the step's new tokens and index them into the paged pool.
        Built from Python lists with a handful of tensor ops: it runs every step."""
        bs, dev = self.block_size, self.device
        starts, num_new = plan.starts, [len(t) for t in plan.tokens]
        B, Tq = len(starts), max(num_new)
        nblk = -(-max(st + n for st, n in zip(starts, num_new)) // bs)
        L = nblk * bs
        ids, pos, table = [], [], []
        for toks, st, blocks in zip(plan.tokens, starts, plan.tables):
            ids += toks
            pos += range(st, st + len(toks))
            table += blocks + [blocks[0]] * (nblk - len(blocks))
        T = len(ids)
        tables = torch.tensor(table, dtype=torch.long)
        positions = torch.tensor(pos, dtype=torch.long)
        n_t = torch.tensor(num_new)
        seq_of = torch.arange(B).repeat_interleave(n_t, output_size=T)
        cu = torch.zeros(B + 1, dtype=torch.long)
        torch.cumsum(n_t, 0, out=cu[1:])
        # Pool rows and chunks (see AttnContext), for every layer at once.
        nl, nkv = self.args.num_layers, self.model.kv_heads_local
        heads = torch.arange(nkv)
        write_base = tables[seq_of * nblk + positions // bs] * (nl * 2 * nkv * bs) + positions % bs
        write_rows = (  # nl,T,2,nkv
            write_base[None, :, None, None]
            + torch.arange(0, nl * 2 * nkv * bs, 2 * nkv * bs)[:, None, None, None]
            + torch.tensor([0, nkv * bs])[:, None]
            + heads * bs
        )
        gather = (  # nl,B,2,nkv,nblk
            tables.view(1, B, 1, 1, nblk) * (nl * 2 * nkv)
            + torch.arange(0, nl * 2 * nkv, 2 * nkv)[:, None, None, None, None]
            + torch.tensor([0, nkv])[:, None, None]
            + heads[:, None]
        )
        need = B * 2 * nkv * L * self.args.head_dim
        if self._gather_out.numel() < need:  # grown by a quarter more: not at every block
            self._gather_out = None  # the old buffer goes before the new one is made
            self._gather_out = torch.empty(need + need // 4, dtype=self.kv_pool.dtype, device=dev)
        # Query slot j of sequence b sits at position starts[b] + j and sees keys up to
        # there; padded slots (j >= num_new[b]) see key 0 only, so no row is all -inf.
        j = torch.arange(Tq)
        q_pos = torch.tensor(starts)[:, None] + j
        q_pos.masked_fill_(j >= n_t[:, None], 0)
        hidden = torch.arange(L) > q_pos[:, :, None]  # B,Tq,L
        mask = torch.zeros(B, 1, Tq, L, dtype=self.model.cos.dtype)
        mask[:, 0].masked_fill_(hidden, float("-inf"))
        q_index = out_index = None
        if T != B * Tq:  # ragged: map flat tokens to and from the padded [B, Tq] grid
            j_of = torch.arange(T) - cu[seq_of]
            q_index = torch.zeros(B, Tq, dtype=torch.long)
            q_index[seq_of, j_of] = torch.arange(T)
            out_index = (seq_of * Tq + j_of).to(dev)
            q_index = q_index.to(dev)
        pool = self.kv_pool
        ctx = AttnContext(
            rows=pool.view(-1, pool.shape[-1]),
            chunks=pool.view(-1, pool[0, 0, 0, 0].numel()),
            write_rows=write_rows.to(dev).unbind(0),
            gather_chunks=gather.view(nl, -1).to(dev).unbind(0),
            gather_out=self._gather_out,
            mask=mask.to(dev),
            q_index=q_index,
            out_index=out_index,
        )
        if plan.every:  # those sequences' every row, the others' last
            whole = torch.zeros(B, dtype=torch.bool)
            whole[plan.every] = True
            last = torch.nonzero(whole[seq_of] | (torch.arange(T) == cu[1:][seq_of] - 1))[:, 0]
            last = last.to(dev)
        else:
            last = None if T == B else (cu[1:] - 1).to(dev)
        return torch.tensor(ids, dtype=torch.long, device=dev), positions.to(dev), ctx, last

    def forward(
        self,
        seqs: list[Sequence],
        num_new: list[int],
        every: list[int] | None = None,
        copies: list[tuple[int, int]] | None = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Compute KV for `num_new[i]` uncached tokens of each sequence and return
        logits [B, vocab] for the last of them, and, for each sequence index in
        `every`, logits [num_new[i], vocab] for all of them. Under tensor parallelism
        this is rank 0: the other ranks get the plan first and run it too. `copies`:
        KV blocks (source, destination) copied before the forward, on every rank."""
        plan = self.plan(seqs, num_new, every or [], copies)
        if self.tp is not None:
            self.tp.send(plan)
        logits = self.run(plan)
        if not plan.every:
            return logits, {}
        whole = set(plan.every)
        sizes = [n if b in whole else 1 for b, n in enumerate(num_new)]
        parts = logits.split(sizes)
        return torch.stack([p[-1] for p in parts]), {b: parts[b] for b in plan.every}

    def pack_weights(self) -> None:
        """Choose each linear layer's GEMM path by measuring on this CPU (workers/gemm.py;
        cached per CPU model in the model cache), once, on the thread that runs the
        model and with its thread count: both the timings and MKL's packed layout
        depend on it (packed on 1 thread and used on 2, a batch-32 GEMM took 775 us
        instead of 390). `run` does it on first use."""
        if self.gemm_plan is None:
            from wire.host import cache_dir

            cache = Path(self.gemm_cache_dir) if self.gemm_cache_dir else cache_dir()
            self.gemm_plan = self.model.choose_gemm(cache / "gemm-plans.json")

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> torch.Tensor:
        """One forward over `plan` on this rank's shard (every rank calls it)."""
        self.pack_weights()
        try:
            for src, dst in plan.copies:
                self.kv_pool[dst].copy_(self.kv_pool[src])
            input_ids, positions, ctx, last = self._context(plan)
            hidden = self.model(input_ids, positions, ctx)
            return self.model.logits(hidden if last is None else hidden.index_select(0, last))
        except Exception as e:
            if self.tp is not None:  # a collective may be half done: the group is gone
                self.tp.failed(e)
            raise
