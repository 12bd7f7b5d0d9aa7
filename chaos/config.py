"""The `chaos:` section of a config file: load shape, fault lengths, thresholds, soak.

`ChaosRunConfig` is the cluster's `Config` plus that section: what `pdcluster up`,
`check-config` and `chaos` load, so one file serves both. The cluster itself never
reads it (cluster/config.py imports nothing from here), and is started with
`cluster_config(cfg)`. Like cluster/config.py, this imports neither torch nor Ray (nor
does chaos/scenarios.py, whose names it checks): `pdcluster up` validates before it
imports Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

from cluster.config import Config, load_config, need, parse_config


class _Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class Thresholds(_Strict):
    """What a chaos scenario must meet (`pdcluster chaos`)."""

    min_success_rate: Annotated[
        float,
        Meta(
            ge=0,
            le=1,
            description="share of the requests sent that end in a 200 with the fault-free text",
        ),
    ] = 0.995
    max_hung: Annotated[
        int, Meta(ge=0, description="requests with no end by router.request_timeout_s + 10 s")
    ] = 0
    max_corrupted: Annotated[
        int, Meta(ge=0, description="200s whose text differs from the fault-free pass")
    ] = 0
    max_recovery_s: Annotated[
        float, Meta(ge=0, description="from the fault to goodput back at 90 % of the baseline")
    ] = 20.0
    max_leaked: Annotated[
        int, Meta(ge=0, description="sum of `/debug/state`'s counts once the load has ended")
    ] = 0
    excuse_in_flight: Annotated[
        bool,
        Meta(
            description="requests in flight at the fault (started before its end + 1 s, not "
            "ended before its start) may fail cleanly; the success rate is then of the others"
        ),
    ] = False


class SoakConfig(_Strict):
    """`pdcluster chaos --soak SECONDS`: long load, rare faults, bounds on growth."""

    fault_every_s: Annotated[
        float,
        Meta(ge=0, description="one fault from the mixed schedule this often; 0: no faults"),
    ] = 300.0
    sample_s: Annotated[
        float, Meta(gt=0, description="tables, RSS and open fds are sampled this often")
    ] = 5.0
    max_rss_growth_mb_per_10k: Annotated[
        float,
        Meta(ge=0, description="RSS growth per process, in MB per 10,000 requests after warm-up"),
    ] = 64.0
    max_fds_growth: Annotated[
        int, Meta(ge=0, description="open fds growth per process, first sample to last")
    ] = 64
    rejected_share: Annotated[
        float,
        Meta(
            ge=0,
            lt=1,
            description="this share of the requests send a prompt over model.max_model_len: "
            "each must get a 400",
        ),
    ] = 0.2
    stream: Annotated[bool, Meta(description="streamed answers; false: plain JSON answers")] = True
    warmup_requests: Annotated[
        int,
        Meta(
            ge=0,
            description="RSS slopes start after this many requests (0: after the first quarter "
            "of the samples)",
        ),
    ] = 0


class TestbedConfig(_Strict):
    """`pdcluster testbed` and `pdcluster chaos --testbed`: every node in a network
    namespace of its own (chaos/testbed.py)."""

    name: Annotated[
        str,
        Meta(
            pattern=r"^[a-z0-9]{1,8}$",
            description="names the testbed's namespaces (`pdtb-<name>-<i>`): two testbeds "
            "with different names can run side by side",
        ),
    ] = "pd"
    subnet: Annotated[
        str,
        Meta(
            description="the private IPv4 range the hosts' addresses come from; nothing "
            "outside it is ever contacted"
        ),
    ] = "10.231.0.0/24"
    dead_after_s: Annotated[
        int,
        Meta(
            ge=3,
            le=60,
            description="Ray's GCS declares a node dead after this many seconds without an "
            "answer to its health checks (one a second); Ray's default is about 65 s",
        ),
    ] = 10
    partition_s: Annotated[
        float,
        Meta(
            gt=0,
            description="how long a network fault that Ray should survive lasts (at most a "
            "third of dead_after_s: a healed TCP connection resumes only at its next "
            "retransmission, seconds later); the cut-from-head scenario lasts dead_after_s + this",
        ),
    ] = 3.0


class ChaosConfig(_Strict):
    """`pdcluster chaos`: load shape, fault lengths and thresholds."""

    concurrency: Annotated[
        int, Meta(ge=1, description="streaming clients, each one request at a time")
    ] = 8
    max_tokens: Annotated[
        int, Meta(ge=1, description="output tokens per request (greedy, `ignore_eos`)")
    ] = 32
    prompts: Annotated[
        int,
        Meta(
            ge=1,
            description="distinct prompts, cycled; each one's text is known from the baseline",
        ),
    ] = 32
    baseline_s: Annotated[
        float,
        Meta(gt=0, description="fault-free load first: the texts and the baseline goodput"),
    ] = 15.0
    warmup_s: Annotated[
        float,
        Meta(
            gt=0,
            description="load before each fault (its goodput is the recovery reference)",
        ),
    ] = 5.0
    stall_s: Annotated[float, Meta(gt=0, description="SIGSTOP length of a stall")] = 6.0
    node_down_s: Annotated[
        float, Meta(gt=0, description="a killed local node is replaced after this long")
    ] = 5.0
    transfer_fault_s: Annotated[
        float, Meta(gt=0, description="how long injected transfer faults stay on")
    ] = 10.0
    settle_s: Annotated[
        float,
        Meta(
            gt=0,
            description="longest wait for `/health` ok and zero state between scenarios",
        ),
    ] = 90.0
    thresholds: Annotated[Thresholds, Meta(description="what every scenario must meet")] = (
        Thresholds()
    )
    scenarios: Annotated[
        dict[str, dict[str, float | bool]],
        Meta(
            description="per scenario name (`pdcluster chaos --list`), the threshold fields "
            "that differ from `chaos.thresholds`, e.g. `{kill-router: {excuse_in_flight: true}}`"
        ),
    ] = {}
    soak: Annotated[SoakConfig, Meta(description="the soak's bounds")] = SoakConfig()
    testbed: Annotated[
        TestbedConfig, Meta(description="the network-namespace testbed (`--testbed`)")
    ] = TestbedConfig()


class ChaosRunConfig(Config):
    """A cluster config with its `chaos:` section (`pdcluster chaos`)."""

    chaos: ChaosConfig = ChaosConfig()

    def check(self) -> None:
        super().check()
        _check_chaos(self.chaos)


def _check_chaos(c: ChaosConfig) -> None:
    """Scenario overrides: known scenarios, threshold fields, each of its field's kind;
    the testbed's range and fault lengths."""
    import ipaddress

    from chaos.scenarios import SCENARIOS
    from chaos.testbed import usable

    try:
        net = ipaddress.ip_network(c.testbed.subnet)
    except ValueError as e:
        need(False, "chaos.testbed.subnet", f"an IPv4 network ({e})")
    need(
        usable(net),
        "chaos.testbed.subnet",
        "a private IPv4 range (not loopback, link-local or reserved)",
    )
    need(
        c.testbed.partition_s <= c.testbed.dead_after_s / 3,
        "chaos.testbed.partition_s",
        f"at most a third of chaos.testbed.dead_after_s ({c.testbed.dead_after_s}): a healed "
        "TCP connection resumes only at its next retransmission",
    )

    fields = set(Thresholds.__struct_fields__)
    for name, over in c.scenarios.items():
        need(name in SCENARIOS, f"chaos.scenarios.{name}", f"one of {', '.join(SCENARIOS)}")
        for k, v in over.items():
            need(k in fields, f"chaos.scenarios.{name}.{k}", f"one of {', '.join(sorted(fields))}")
            kind = type(getattr(c.thresholds, k))
            need(
                isinstance(v, bool) == (kind is bool), f"chaos.scenarios.{name}.{k}", kind.__name__
            )


def parse_chaos_config(data: object) -> ChaosRunConfig:
    """Validate an already-parsed YAML document, `chaos:` section included."""
    return parse_config(data, ChaosRunConfig)


def load_chaos_config(path: str | Path) -> ChaosRunConfig:
    """Read and validate a YAML config file, `chaos:` section included."""
    return load_config(path, ChaosRunConfig)


def cluster_config(cfg: Config) -> Config:
    """`cfg` without the sections only `pdcluster chaos` reads: what the cluster is started
    with (its processes never see chaos's types)."""
    return Config(**{f: getattr(cfg, f) for f in Config.__struct_fields__})
