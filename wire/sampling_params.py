"""Per-request sampling parameters: the one struct the router hands to the workers.

It lives in `wire` because the router and the workers both use it and neither may
import the other's engine; the router builds it (`cluster.admission.to_sampling_params`)
after validating the request, so the values here are already in range.
"""

from __future__ import annotations

import msgspec


class SamplingParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = -1  # -1 or 0 = disabled
    seed: int | None = None  # per-request generator when set
    stop: list[str] = []  # stop strings: applied by the router's detokenizer
    stop_token_ids: list[int] = []  # applied by the workers, like EOS
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS / stop_token_ids banned before this many tokens
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Prefix caching: prompts share cached KV blocks only under the same salt (none
    # included), so a tenant can keep its prompts from others' cache-timing probes.
    cache_salt: str | None = None
    # Logits processing, with vLLM's semantics (workers/sampler.py): on output tokens
    # (frequency, presence) or prompt and output tokens (repetition), computed from the
    # sequence's own token list on whichever worker samples (prefill token 1, decode
    # the rest), so both tiers agree without carrying counts across the handoff.
    presence_penalty: float = 0.0  # minus this for a token already in the output
    frequency_penalty: float = 0.0  # minus this per occurrence in the output
    repetition_penalty: float = 1.0  # >1: a seen token's logit divided (>0) or multiplied
    min_p: float = 0.0  # drop tokens below min_p x the most probable one's probability
    logit_bias: dict[int, float] = {}  # added to those ids' logits
    allowed_token_ids: list[int] = []  # only these may be sampled (empty: all)
    bad_words_ids: list[list[int]] = []  # a word's last token banned after its prefix
    # Logprobs (wire.api.TokenLogprobs): None = not asked; k = each output token's own
    # and the top k (0: its own only). `prompt_logprobs` the same for prompt tokens 1..,
    # computed where the prompt is (prefill's, or decode's own local prefill); a prompt
    # that asks for them is not served from, nor added to, the prefix cache.
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # Structured output: an llguidance grammar (`LLMatcher.grammar_from_*`, a JSON schema,
    # regex, choice or Lark grammar, made by cluster/structured.py). Every worker that
    # samples for the request masks its logits with it, replaying the output so far.
    grammar: str | None = None
