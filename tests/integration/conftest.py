"""A Ray cluster for a worker-level module (head + a prefill and a decode node),
shared by that module's tests: Ray is slow to start on two cores."""

from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster


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
