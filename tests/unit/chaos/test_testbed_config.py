"""The testbed's part of a config (`chaos.testbed`, and the nodes it makes hosts of) is
checked before anything is made: a range that cannot carry traffic between namespaces, a
partition too long for Ray to outlast, a name that cannot name a namespace, a node that
cannot be a host, or more hosts than the range holds, each name the key."""

from __future__ import annotations

import pytest
import yaml

from chaos.config import parse_chaos_config
from chaos.testbed_ray import RayTestbed
from cluster.config import ConfigError
from tests.support import ROOT, _merge

pytestmark = pytest.mark.unit


def _cfg(**over):
    data = yaml.safe_load((ROOT / "configs" / "chaos.yaml").read_text())
    return parse_chaos_config(_merge(data, over))


@pytest.mark.parametrize(
    "testbed, pattern",
    [
        ({"subnet": "8.8.8.0/24"}, r"`chaos\.testbed\.subnet`.*private"),
        ({"subnet": "127.0.0.0/24"}, r"`chaos\.testbed\.subnet`.*loopback"),
        ({"subnet": "169.254.0.0/24"}, r"`chaos\.testbed\.subnet`"),
        ({"subnet": "not a network"}, r"`chaos\.testbed\.subnet`"),
        ({"dead_after_s": 6, "partition_s": 3}, r"`chaos\.testbed\.partition_s`.*third"),
        ({"name": "Bad-Name"}, r"chaos\.testbed\.name"),
    ],
)
def test_a_bad_testbed_section_names_the_key(testbed, pattern):
    with pytest.raises(ConfigError, match=pattern):
        _cfg(chaos={"testbed": testbed})


def test_the_hosts_must_fit_the_range_and_be_nameable():
    assert [h.node for h in RayTestbed(_cfg()).net.hosts] == [
        "head", "prefill-0", "prefill-1", "decode-0", "decode-1",
    ]  # fmt: skip
    with pytest.raises(ConfigError, match=r"`chaos\.testbed\.subnet`.*room"):
        RayTestbed(_cfg(chaos={"testbed": {"subnet": "10.231.0.0/30"}}))
    for bad in ("head", "a/b"):
        nodes = [{"name": bad, "num_cpus": 1, "resources": {"decode_node": 1}}]
        data = yaml.safe_load((ROOT / "configs" / "chaos.yaml").read_text())
        data["cluster"]["nodes"][3:] = nodes
        cfg = parse_chaos_config(data)
        with pytest.raises(ConfigError, match=r"`cluster\.nodes\."):
            RayTestbed(cfg)
