"""Per-request sampling parameters: the one struct the router hands to the workers.

It lives in `workers` because `workers` must never import `cluster`; the router
builds it (`cluster.protocol.to_sampling_params`) after validating the request,
so the values here are already in range.
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
