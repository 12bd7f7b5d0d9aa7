"""A Ray cluster for a worker-level module (head + a prefill and a decode node),
shared by that module's tests: Ray is slow to start on two cores; and a state
directory of its own for a test that builds a network testbed."""

from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster

from chaos import testbed


@pytest.fixture(scope="module")
def ray_nodes():
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "object_store_memory": 128 * 1024**2,
            "include_dashboard": False,
        },
    )
    for res in ("prefill_node", "decode_node"):
        cluster.add_node(num_cpus=1, resources={res: 1}, object_store_memory=128 * 1024**2)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    """Testbed state files of this test only: a test's testbed never meets a user's."""
    monkeypatch.setattr(testbed, "STATE_DIR", tmp_path / "state")
    return tmp_path / "state"
