"""Replica placement (cluster/launcher.py plan_placement): one unit of the role's node
resource per replica while there are units for every replica of every role using it."""

from __future__ import annotations

from cluster.launcher import plan_placement


def _node(i: int, **res) -> dict:
    return {"NodeID": f"n{i}", "Alive": True, "Resources": {"CPU": 1.0, **res}}


def test_one_unit_per_replica_on_distinct_nodes():
    nodes = [_node(0, decode_node=1), _node(1, decode_node=1), _node(2, prefill_node=1)]
    p = plan_placement("decode", "decode_node", 2, nodes)
    assert p.share == 1.0 and sorted(p.targets) == ["n0", "n1"]


def test_fewer_units_than_replicas_share_with_a_warning(caplog):
    p = plan_placement("decode", "decode_node", 2, [_node(0, decode_node=1)])
    assert p.share < 0.01 and p.targets == ["n0", "n0"]
    assert "share a node" in caplog.text


def test_roles_sharing_one_resource_count_together():
    """Both roles on `worker: 1` nodes: a whole unit each would leave decode unplaceable."""
    nodes = [_node(0, worker=1), _node(1, worker=1)]
    assert plan_placement("prefill", "worker", 1, nodes, demand=2).share == 1.0
    assert plan_placement("prefill", "worker", 2, nodes, demand=3).share < 0.01
    assert plan_placement("decode", "worker", 1, [_node(0, worker=1)], demand=2).share < 0.01


def test_dead_nodes_and_fractions_do_not_count():
    nodes = [_node(0, decode_node=1), {**_node(1, decode_node=1), "Alive": False}]
    assert plan_placement("decode", "decode_node", 2, nodes).share < 0.01
    assert plan_placement("decode", "decode_node", 1, [_node(0, decode_node=0.5)]).share < 0.01
