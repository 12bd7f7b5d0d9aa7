"""What crosses the wire between the router and the workers: the spec a worker
starts from, prefill's result, typed errors, and the workers' stats.

This module imports neither torch nor nixl (nor anything that does): the router
imports it, and the router process never loads either. Stats are typed structs
shared by the workers, the health poller, the metrics and the tests, so a renamed
field fails loudly instead of reading as 0.
"""

from __future__ import annotations

import time

import msgspec

from transfer.faults import FaultConfig
from transfer.handle import KVHandle

# Upper bounds (seconds) of the kv_transfer_seconds histogram buckets.
XFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class WorkerError(Exception):
    """A worker could not serve a request (engine failure, deadline, lost channel):
    the router retries or migrates it elsewhere."""


class RequestReleased(WorkerError):
    """The router let go of this attempt while it was still queued or running."""


class SequenceFailed(Exception):
    """This request alone could not be computed (e.g. sampling found every token
    banned); its neighbours in the batch go on. Not retried: the same request
    would fail the same way on any replica. `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status

    def __reduce__(self):  # pickles across Ray with its status
        return (SequenceFailed, (str(self), self.status))


def time_left(deadline: float, what: str) -> float:
    """Seconds left before `deadline` (this process's `time.monotonic()`: processes send
    each other time left, never a time stamp); TimeoutError, naming `what`, when none is."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"{what} passed its deadline")
    return left


class WorkerSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a worker needs to start. No defaults of its own: built from the
    config by `cluster.config.worker_spec` alone (the launcher, and tests)."""

    role: str  # "prefill" | "decode"
    replica: int
    model_dir: str  # "": resolve model_source on this worker's own node
    max_model_len: int
    kv_blocks: int
    block_size: int
    model_source: str
    cache_dir: str | None
    dtype: str
    device: str
    max_batched_tokens: int
    prefix_caching: bool
    max_running: int
    transfer_timeout_s: float
    lease_ttl_s: float
    max_pending: int
    num_threads: int
    stream_interval: int  # decode: tokens gathered per request before they go out
    faults: FaultConfig | None
    transfer_backend: str  # "nixl" | "ray"
    tp_rank: int
    tp_size: int
    group: str  # rank r's Ray actor name is f"{group}-rank{r}"

    def rank_name(self, rank: int) -> str:
        return f"{self.group}-rank{rank}"


# One position's logprobs: (logprob of its token, its rank (1 = most likely), the top
# ids, their logprobs), from the model's raw log-softmax, before any sampling transform
# (temperature, penalties, masks), as vLLM's default `raw_logprobs`.
TokenLogprobs = tuple[float, int, list[int], list[float]]


class Delta(msgspec.Struct):
    """A request's new output on a decode output channel (and its merges): tokens,
    the finish reason once it ended, and, when the request asked for them, each
    token's logprobs (aligned with `tokens`) and, with the first token of a sequence
    prefilled on decode, the prompt's (`prompt_logprobs`: tokens 1.. of the prompt)."""

    tokens: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs] | None = None

    def extend(self, later: Delta) -> None:
        """Append `later` (this request's next delta) to this one, in place (a delta's
        lists are its own: made by the worker for it, or decoded for it)."""
        self.tokens += later.tokens
        self.finish_reason = later.finish_reason
        if later.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs += later.logprobs
        if later.prompt_logprobs is not None:
            self.prompt_logprobs = later.prompt_logprobs


class PrefillResult(msgspec.Struct, frozen=True):
    request_id: str
    first_token: int
    finish_reason: str | None  # set when the first token already ends the request
    handle: KVHandle | None  # None when finished: nothing to transfer
    queued_s: float = 0.0  # waited in prefill's queue before it was first scheduled
    cached_tokens: int = 0  # prompt tokens found in prefill's prefix cache
    logprobs: TokenLogprobs | None = None  # the first token's, when asked for
    prompt_logprobs: list[TokenLogprobs] | None = None  # tokens 1.. of the prompt, when asked


class EngineStats(msgspec.Struct, frozen=True, kw_only=True):
    """What the engine thread publishes after every pass of its loop: the only view
    of engine, block and lease state other threads get (they never read it live)."""

    steps: int  # forwards run: the progress counter the watchdog reads
    running: int
    waiting: int  # queued for (re)computation
    waiting_for_blocks: int  # decode: pulled KV waiting for free blocks
    queued_tokens: int  # uncached tokens of `waiting`
    blocked: bool  # work is queued but no block is free for it: waiting, not stalled
    used_blocks: int
    free_blocks: int
    # Prefix caching: blocks no request holds that keep reusable KV (free for new work,
    # not counted in used_blocks), and prompt tokens asked for / found cached, ever.
    cached_blocks: int = 0
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    leases: int = 0  # prefill: leases held
    # Decode: blocks of failed pulls held out of the pool while a READ may still write
    # them (counted in used_blocks too).
    held_blocks: int = 0
    # Why the worker cannot serve and must be restarted ("" when none): the watchdog
    # restarts a worker that says so (stalled for good, a READ NIXL never releases).
    fault: str = ""
    leases_expired: int = 0  # prefill: swept unclaimed or abandoned, ever
    preemptions: int = 0  # running sequences whose blocks were taken back, ever


class TransferStats(msgspec.Struct, frozen=True, kw_only=True):
    """Decode's cumulative pull counters (pdcluster_kv_transfer_* metrics)."""

    count: int
    bytes: int
    seconds: float
    timeouts: int
    failures: int
    buckets: list[int]  # per XFER_BUCKETS bound, then +Inf
    renewals: int = 0  # prefill leases renewed while waiting here for free blocks


class WorkerStats(msgspec.Struct, frozen=True, kw_only=True):
    """Rank 0 of a worker group, as `stats()` answers."""

    role: str
    replica: int
    engine: EngineStats
    omp_threads: int | None  # OpenMP's thread count on the model thread
    # GEMM path per weight shape and row bucket (1, 2-127, 128+), measured on this CPU
    gemm: dict[str, list[str]] | None = None
    pid: int = 0
    rss_bytes: int = 0
    open_fds: int = 0
    node_id: str = ""

    @property
    def busy(self) -> bool:
        """Work that should make the step counter move (the watchdog's question)."""
        e = self.engine
        return (e.running + e.waiting > 0) and not e.blocked


class PrefillStats(WorkerStats, frozen=True, kw_only=True):
    pending: int  # prefill calls not answered yet

    @property
    def pinned_blocks(self) -> int:
        return self.engine.used_blocks


class DecodeStats(WorkerStats, frozen=True, kw_only=True):
    streams: int  # requests decoding here (generate calls open)
    channels: int  # output channels open
    transfers_pending: int  # pulls in flight
    transfers: TransferStats


class RankStats(msgspec.Struct, frozen=True, kw_only=True):
    rank: int
    steps: int
    omp_threads: int | None
