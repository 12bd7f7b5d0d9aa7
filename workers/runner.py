"""Model runner: loads one rank's shard of the model, owns its KV pool, and
runs one batched forward over a list of sequences."""

from __future__ import annotations

from pathlib import Path

import torch

from workers.kv_cache import allocate_pool
from workers.model import AttnContext, LlamaModel, ModelArgs
from workers.sequence import Sequence

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelRunner:
    def __init__(self, model_dir: str | Path, *, max_model_len: int, num_blocks: int,
                 block_size: int, dtype: str = "float32", device: str = "cpu",
                 tp_rank: int = 0, tp_size: int = 1):
        self.args = ModelArgs.from_hf_dir(model_dir)
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.device = torch.device(device)
        torch_dtype = DTYPES[dtype]
        with torch.device(self.device):
            self.model = LlamaModel(self.args, max_model_len, tp_rank, tp_size).to(torch_dtype)
        self.model.load_hf_weights(model_dir)
        self.model.eval()
        self.kv_pool = allocate_pool(num_blocks, self.args.num_layers, block_size,
                                     self.model.kv_heads_local, self.args.head_dim,
                                     torch_dtype, self.device)

    def _context(self, seqs: list[Sequence], num_new: list[int]):
        """Flatten the step's new tokens and index them into the paged pool."""
        bs, dev = self.block_size, self.device
        starts = [s.num_cached for s in seqs]
        ctx_lens = [st + n for st, n in zip(starts, num_new)]
        B, Tq, L = len(seqs), max(num_new), max(ctx_lens)
        ids, pos = [], []
        for s, st, n in zip(seqs, starts, num_new):
            ids.extend(s.token_ids[st:st + n])
            pos.extend(range(st, st + n))
        nblk = max(len(s.block_table) for s in seqs)
        tables = torch.tensor([s.block_table + [0] * (nblk - len(s.block_table)) for s in seqs],
                              dtype=torch.long)
        input_ids = torch.tensor(ids, dtype=torch.long)
        positions = torch.tensor(pos, dtype=torch.long)
        # Which sequence each flat token belongs to and its slot within the padded query.
        seq_of = torch.repeat_interleave(torch.arange(B), torch.tensor(num_new))
        cu = torch.tensor([0] + num_new).cumsum(0)
        j_of = torch.arange(len(ids)) - cu[seq_of]
        write_blocks = tables[seq_of, positions // bs]
        write_offsets = positions % bs
        key_pos = torch.arange(L)
        gather_blocks = tables[:, key_pos // bs]
        gather_offsets = (key_pos % bs).expand(B, L)
        q_valid = torch.arange(Tq)[None, :] < torch.tensor(num_new)[:, None]       # B,Tq
        q_pos = torch.tensor(starts)[:, None] + torch.arange(Tq)[None, :]            # B,Tq
        q_pos = torch.where(q_valid, q_pos, torch.zeros_like(q_pos))  # padding sees key 0
        mask = key_pos[None, None, :] <= q_pos[:, :, None]                           # B,Tq,L
        q_index = torch.zeros(B, Tq, dtype=torch.long)
        q_index[seq_of, j_of] = torch.arange(len(ids))
        ctx = AttnContext(
            write_blocks=write_blocks.to(dev), write_offsets=write_offsets.to(dev),
            gather_blocks=gather_blocks.to(dev), gather_offsets=gather_offsets.to(dev),
            mask=mask.unsqueeze(1).to(dev), q_index=q_index.to(dev),
            out_index=(seq_of * Tq + j_of).to(dev))
        last = (cu[1:] - 1).to(dev)
        return input_ids.to(dev), positions.to(dev), ctx, last

    @torch.inference_mode()
    def forward(self, seqs: list[Sequence], num_new: list[int]) -> torch.Tensor:
        """Compute KV for `num_new[i]` uncached tokens of each sequence and
        return logits [B, vocab] for the last of them."""
        input_ids, positions, ctx, last = self._context(seqs, num_new)
        hidden = self.model(input_ids, positions, self.kv_pool, ctx)
        return self.model.logits(hidden[last])
