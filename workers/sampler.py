"""Per-request sampling over a batch of logits."""

from __future__ import annotations

import hashlib
import math

import torch

from wire.api import TokenLogprobs
from workers.grammar import masks as grammar_masks
from workers.sequence import Sequence


class SampleError(Exception):
    """One sequence could not be sampled; `status` is 400 when its own parameters
    made that impossible, 500 otherwise. The rest of the batch is unaffected."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


def _banned(seq: Sequence, eos_ids: tuple[int, ...], vocab: int) -> list[int]:
    """Ids `seq` may not produce yet (min_tokens), checked against the vocabulary
    before any indexing: on CUDA an out-of-range index is a device assert that
    poisons the context for every request."""
    p = seq.params
    if seq.num_output >= p.min_tokens:
        return []
    banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_ids))
    bad = [t for t in banned if not 0 <= t < vocab]
    if bad:
        raise SampleError(f"stop_token_ids {bad[:5]} are outside the vocabulary [0, {vocab})", 400)
    if len(set(banned)) >= vocab:
        raise SampleError(
            "min_tokens bans every token of the vocabulary (stop_token_ids "
            "and EOS): nothing can be sampled",
            400,
        )
    return banned


@torch.inference_mode()
def logprobs_of(logits: torch.Tensor, token_ids: list[int], k: int) -> list[TokenLogprobs]:
    """Per row of raw `logits` [m, vocab]: the log-softmax at `token_ids[row]`, that
    token's rank (1 = most likely) and the top `k` (ids, logprobs), most likely first."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(token_ids, device=lp.device)[:, None])
    ranks = ((lp > chosen).sum(dim=-1) + 1).tolist()
    if k > 0:
        top = lp.topk(min(k, lp.shape[-1]), dim=-1)
        ids, lps = top.indices.tolist(), top.values.tolist()
    else:
        ids = lps = [[] for _ in token_ids]
    return list(zip(chosen[:, 0].tolist(), ranks, ids, lps, strict=True))


@torch.inference_mode()
def sample(
    logits: torch.Tensor, seqs: list[Sequence], eos_ids: tuple[int, ...]
) -> tuple[list[int | SampleError], list[TokenLogprobs | None]]:
    """One next token per sequence, or a SampleError for a sequence that cannot be
    sampled (that sequence alone fails), and the token's logprobs for a sequence that
    asked for them (`params.logprobs`; None otherwise). Greedy rows (temperature 0)
    take argmax; the rest sample with temperature, top-k and top-p, seeded per request.
    `logits` [len(seqs), vocab] is the caller's scratch: banned ids are set in place."""
    logits = logits.float()
    vocab = logits.shape[-1]
    # Logprobs are of the raw logits (vLLM's default): copied before any transform.
    asked = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    raw = logits[asked] if asked else None
    out: list[int | SampleError | None] = [None] * len(seqs)
    # Structured output first: a grammar's mask, then what the request adds on top.
    processed = [i for i, s in enumerate(seqs) if s.matcher is not None]
    if processed:
        allowed, failed = grammar_masks(seqs, processed, vocab)
        for i, why in failed.items():
            out[i] = SampleError(f"the output cannot follow the requested format: {why}", 400)
        banned = ~allowed.to(logits.device)
        if len(processed) == len(seqs):  # in place: half the time of an indexed copy
            logits.masked_fill_(banned, float("-inf"))
        else:
            for j, i in enumerate(processed):
                logits[i].masked_fill_(banned[j], float("-inf"))
    # min_tokens: stop tokens are not allowed before the minimum is reached.
    rows, cols = [], []
    for i, s in enumerate(seqs):
        try:
            banned = _banned(s, eos_ids, vocab)
        except SampleError as e:
            out[i] = e
            continue
        rows += [i] * len(banned)
        cols += banned
    if rows:
        logits[rows, cols] = float("-inf")
    for i, s in enumerate(seqs):
        if out[i] is None and _processes(s.params):
            try:
                _process_row(logits[i], s, vocab)
                if s.matcher is None:
                    processed.append(i)
            except SampleError as e:
                out[i] = e
            except Exception as e:  # noqa: BLE001 - one sequence fails, never the batch
                out[i] = SampleError(f"logits processing failed: {type(e).__name__}: {e}")
    if processed:  # one read for them all (a device sync per row would cost a step)
        tops = logits[processed].max(dim=-1).values.tolist()
        for i, top in zip(processed, tops, strict=True):
            # All masked or banned (-inf), or a penalty overflowed (+inf).
            if out[i] is None and not math.isfinite(top):
                out[i] = SampleError("the sampling parameters leave no token to sample", 400)
    greedy = None
    if any(s.params.temperature == 0.0 for s in seqs):
        # max() is argmax (first index on ties) at less than half argmax's cost on CPU.
        greedy = logits.max(dim=-1).indices.tolist()
    for i, s in enumerate(seqs):
        if out[i] is not None:
            continue
        p = s.params
        if p.temperature == 0.0:
            out[i] = greedy[i]
            continue
        try:
            out[i] = _sample_row(logits[i], s)
        except SampleError as e:
            out[i] = e
        except Exception as e:  # noqa: BLE001 - one sequence fails, never the batch
            out[i] = SampleError(f"sampling failed: {type(e).__name__}: {e}")
    lps: list[TokenLogprobs | None] = [None] * len(seqs)
    rows = [j for j, i in enumerate(asked) if not isinstance(out[i], SampleError)]
    if rows:
        k = max(seqs[asked[j]].params.logprobs for j in rows)
        got = logprobs_of(raw[rows], [out[asked[j]] for j in rows], k)
        for j, (lp, rank, ids, top) in zip(rows, got, strict=True):
            n = seqs[asked[j]].params.logprobs
            lps[asked[j]] = (lp, rank, ids[:n], top[:n])
    return out, lps


def _processes(p) -> bool:
    return bool(
        p.presence_penalty
        or p.frequency_penalty
        or p.repetition_penalty != 1.0
        or p.logit_bias
        or p.allowed_token_ids
        or p.bad_words_ids
    )


def _process_row(row: torch.Tensor, s: Sequence, vocab: int) -> None:
    """vLLM's logits processing for one sequence, in place, in vLLM's order: allowed
    token ids, bad words, logit bias, then the repetition, frequency and presence
    penalties. Whole-vocabulary tensor operations on the logits' device; what depends
    only on the request (masks, bias) is built once per sequence, and the seen and
    count vectors are kept up to date with each new token (`s.sampling_cache`). Ids are
    checked against the vocabulary first (out of range is a device assert on CUDA)."""
    p, c, dev = s.params, s.sampling_cache, row.device
    if "ids_ok" not in c:
        ids = [*p.allowed_token_ids, *p.logit_bias, *(t for w in p.bad_words_ids for t in w)]
        if any(not 0 <= t < vocab for t in ids):
            raise SampleError(f"token ids outside the vocabulary [0, {vocab})", 400)
        c["ids_ok"] = True
    if p.allowed_token_ids:
        if "blocked" not in c:
            blocked = torch.ones(vocab, dtype=torch.bool, device=dev)
            blocked[torch.tensor(p.allowed_token_ids, device=dev)] = False
            c["blocked"] = blocked
        row.masked_fill_(c["blocked"], float("-inf"))
    output = s.token_ids[s.num_prompt_tokens :]
    banned = [w[-1] for w in p.bad_words_ids if len(w) == 1 or output[-(len(w) - 1) :] == w[:-1]]
    if banned:
        row[torch.tensor(banned, device=dev)] = float("-inf")
    if p.logit_bias:
        if "bias" not in c:
            c["bias"] = (
                torch.tensor(list(p.logit_bias), device=dev),
                torch.tensor(list(p.logit_bias.values()), dtype=row.dtype, device=dev),
            )
        row.index_add_(0, *c["bias"])
    if p.repetition_penalty != 1.0:
        seen, n = c.get("seen", (torch.zeros(vocab, dtype=torch.bool, device=dev), 0))
        if n < len(s.token_ids):
            seen[torch.tensor(s.token_ids[n:], device=dev)] = True
        c["seen"] = (seen, len(s.token_ids))
        r = p.repetition_penalty
        row.copy_(torch.where(seen, torch.where(row > 0, row / r, row * r), row))
    if (p.frequency_penalty or p.presence_penalty) and output:
        counts, n = c.get("counts", (torch.zeros(vocab, dtype=row.dtype, device=dev), 0))
        if n < len(output):
            new = torch.tensor(output[n:], device=dev)
            counts.index_add_(0, new, torch.ones(len(new), dtype=row.dtype, device=dev))
        c["counts"] = (counts, len(output))
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def apply_min_p(row: torch.Tensor, min_p: float) -> torch.Tensor:
    """Tokens less probable than `min_p` times the most probable one: -inf."""
    probs = torch.softmax(row, dim=-1)
    return row.masked_fill(probs < min_p * probs.max(), float("-inf"))


def _sample_row(row: torch.Tensor, s: Sequence) -> int:
    p = s.params
    row = row / p.temperature
    if p.min_p > 0.0:  # after temperature, before top-k and top-p, as vLLM does
        row = apply_min_p(row, p.min_p)
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
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0.0:
        raise SampleError("the logits left no finite probability to sample from")
    generator = None
    if p.seed is not None:  # the draw for output token k depends on (seed, k) alone
        # On the CPU, with a CPU generator: the same draw whatever device each tier uses.
        generator = torch.Generator().manual_seed(draw_seed(p.seed, s.num_output))
        probs = probs.cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


def draw_seed(seed: int, k: int) -> int:
    """The seed of a seeded request's draw for its k-th output token (k from 0): a
    counter-based stream, so the draw never depends on which worker produced the
    tokens before it, or how many did (prefill samples token 0, decode the rest, a
    migration continues on another worker): the same seeded request gives the same
    text on every path."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{k}".encode(), digest_size=8).digest(), "little")
