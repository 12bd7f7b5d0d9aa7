"""One request's token state inside an engine."""

from __future__ import annotations

import enum

from wire.sampling_params import SamplingParams


class ForkTooLate(ValueError):
    """A fork's parent is not waiting for its KV here (`Engine.add_fork`)."""


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # needs (re)computation of KV for tokens not yet cached
    RUNNING = "running"  # all but the last token cached; decodes one token a step
    WAITING_FOR_BLOCKS = "waiting_for_blocks"  # decode: its KV is to be pulled; no blocks yet
    PULLING = "pulling"  # decode: blocks allocated, a transfer is writing them
    FINISHED = "finished"


class Sequence:
    """Token ids (prompt + output), block table, and how many tokens have KV cached.

    `output_ids` are tokens this request produced before this sequence (a migration
    continues with them; a pulled request arrives with prefill's first token): they
    count as output (max_tokens, min_tokens, the seeded draw's index), not prompt."""

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        output_ids: list[int] | None = None,
    ):
        self.request_id = request_id
        self.token_ids = list(prompt_ids) + list(output_ids or [])
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.block_table: list[int] = []
        self.num_cached = 0
        self.status = SeqStatus.WAITING
        self.finish_reason: str | None = None
        self.aborted = False  # aborted while PULLING: freed once the transfer has ended
        self.block_hashes: list[bytes] = []  # prefix caching: its full prompt blocks' hashes
        self.arrival = 0  # order of arrival in its engine (set when added)
        self.added_at = 0.0  # time.monotonic() when added to its engine
        # Set when first scheduled: seconds it waited, and prompt tokens found cached.
        self.queued_s: float | None = None
        self.cached_tokens = 0
        # The sampler's per-sequence state (masks, seen tokens, counts): workers/sampler.py.
        self.sampling_cache: dict = {}
        # params.grammar's matcher (workers/grammar.py), compiled by the worker before the
        # sequence reaches its engine; the sampler advances it over the output tokens, so
        # a sequence that arrives with output (prefill's token 1, a migration) replays it.
        self.matcher = None
        # params.prompt_logprobs: logprobs of prompt tokens 1.., filled chunk by chunk.
        self.prompt_logprobs: list = []
        self.prompt_logprobs_sent = False  # handed to its worker with the first token
        # n > 1 on decode (Engine.add_fork): a pulled sequence's forks waiting for its KV,
        # and a fork's parent until it is forked.
        self.forks: list[Sequence] = []
        self.fork_of: Sequence | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


def finish_reason(
    seq: Sequence, token: int, eos_ids: tuple[int, ...], max_model_len: int
) -> str | None:
    """Why `seq` ends after appending `token`, or None. One rule for prefill and decode:
    every sequence ends at a stop token, at max_tokens, or at the context window."""
    p = seq.params
    if seq.num_output >= p.min_tokens:
        if (not p.ignore_eos and token in eos_ids) or token in p.stop_token_ids:
            return "stop"
    if seq.num_output >= p.max_tokens or seq.num_tokens >= max_model_len:
        return "length"
    return None
