"""Per-request sampling over a batch of logits."""

from __future__ import annotations

import torch

from workers.sequence import Sequence


@torch.inference_mode()
def sample(logits: torch.Tensor, seqs: list[Sequence], eos_ids: tuple[int, ...]) -> list[int]:
    """One next token per sequence. Greedy rows (temperature 0) take argmax;
    the rest sample with temperature, top-k and top-p, seeded per request.
    `logits` [len(seqs), vocab] is the caller's scratch: banned ids are set in place."""
    logits = logits.float()
    # min_tokens: stop tokens are not allowed before the minimum is reached.
    rows, cols = [], []
    for i, s in enumerate(seqs):
        p = s.params
        if s.num_output < p.min_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_ids))
            rows += [i] * len(banned)
            cols += banned
    if rows:
        logits[rows, cols] = float("-inf")
    greedy = None
    if any(s.params.temperature == 0.0 for s in seqs):
        # max() is argmax (first index on ties) at less than half argmax's cost on CPU.
        greedy = logits.max(dim=-1).indices.tolist()
    out = []
    for i, s in enumerate(seqs):
        p = s.params
        if p.temperature == 0.0:
            out.append(greedy[i])
            continue
        row = logits[i] / p.temperature
        if p.top_k is not None and p.top_k > 0:
            kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_p, idx = probs.sort(descending=True)
            cum = sorted_p.cumsum(0)
            drop = cum - sorted_p > p.top_p  # keep the smallest prefix reaching top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
        out.append(int(torch.multinomial(probs, 1, generator=s.generator)))
    return out
