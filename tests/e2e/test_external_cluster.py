"""`pdcluster up` joining a Ray cluster someone else started (`ray start`): a head and
two worker nodes carrying the prefill/decode resources, each node with its own temp
dir and its own model cache. Every worker resolves the model on its own node; the
tiny model answers over HTTP with Hugging Face's greedy text; shutting pdcluster down
leaves the external cluster running and clean (no pdcluster actors or placement
groups). The external cluster's processes are stopped by pid at the end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.support import greedy_completion, hf_greedy, load_test_config, running_cluster

RAY = str(Path(sys.executable).with_name("ray"))

# Another tenant's Serve app on the external cluster (argv: GCS address, HTTP port).
OTHER_APP = """
import sys
import ray
from ray import serve

ray.init(address=sys.argv[1], log_to_driver=False)
serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[2])}, proxy_location="HeadOnly")

@serve.deployment(ray_actor_options={"num_cpus": 0})
def other(request):
    return "still here"

serve.run(other.bind(), name="other", route_prefix="/other")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_pids(base: Path, client_port: int) -> list[int]:
    """Every process of the external cluster: the daemons name a path under `base` (their
    temp, log or session dir) on their command line, or the head's Ray Client port (that
    server is started detached, outside any daemon's tree); workers are their descendants."""
    import psutil

    mine = (str(base), f"--port={client_port} ")
    daemons = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or []) + " "
        if any(k in cmd for k in mine):
            daemons.append(p)
    pids = set()
    for d in daemons:
        try:
            pids.update(c.pid for c in d.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
        pids.add(d.pid)
    return sorted(pids)


@pytest.fixture(scope="module")
def external():
    # A short path: Ray's Unix sockets live under the temp dir (107-byte limit).
    base = Path(tempfile.mkdtemp(prefix="pdx-", dir="/tmp"))
    port, client_port = _free_port(), _free_port()
    gcs = f"127.0.0.1:{port}"
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "UCX_NET_DEVICES": "lo",
        "GLOO_SOCKET_IFNAME": "lo",
    }
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    nodes = [
        (
            "head",
            [
                "--head",
                f"--port={port}",
                f"--ray-client-server-port={client_port}",
                "--include-dashboard=false",
            ],
            "pdcluster_head",
        ),
        ("prefill", [f"--address={gcs}"], "prefill_node"),
        ("decode", [f"--address={gcs}"], "decode_node"),
    ]
    try:
        for name, args, resource in nodes:
            subprocess.run(
                [
                    RAY,
                    "start",
                    *args,
                    *common,
                    f"--temp-dir={base / f'ray-{name}'}",
                    f"--resources={json.dumps({resource: 1})}",
                ],
                env={**env, "PDCLUSTER_CACHE": str(base / f"cache-{name}")},
                check=True,
                capture_output=True,
                timeout=180,
            )
        yield gcs, base
    finally:
        pids = _cluster_pids(base, client_port)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() for pid in pids):
            assert time.monotonic() < deadline, "external cluster processes did not exit"
            time.sleep(0.2)
        shutil.rmtree(base, ignore_errors=True)


def test_up_on_an_external_cluster_resolves_the_model_per_node_and_leaves_it_clean(external, hf):
    import ray

    gcs, base = external
    cfg = load_test_config(
        "tiny.yaml",
        cluster={"address": gcs, "nodes": []},
        router={"port": 8016},
    )
    _, tok = hf
    ids = tok.encode("An external cluster")
    # Someone else's Serve app runs there already: pdcluster's stop must leave it.
    other = subprocess.run(
        [sys.executable, "-c", OTHER_APP, gcs, str(cfg.router.port)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert other.returncode == 0, other.stderr[-2000:]
    with running_cluster(cfg) as rc:
        assert rc.local is None and rc.serve_was_running
        r = httpx.post(f"{rc.url}/v1/completions", timeout=60, json=greedy_completion(ids, 16))
        assert r.status_code == 200, r.text
        want = tok.decode(hf_greedy(hf, ids, 16), skip_special_tokens=False)
        assert r.json()["choices"][0]["text"] == want
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        for g in rc.prefill + rc.decode:
            info = ray.get(g.leader.ready.remote(), timeout=30)
            assert f"{g.role}_node" in nodes[info["node_id"]]
    # Each worker node resolved the model into its own cache; the head (router) too.
    for name in ("prefill", "decode", "head"):
        assert list((base / f"cache-{name}").glob("**/config.json")), name
    # The external cluster is still up, with nothing of pdcluster's left on it.
    ray.init(address=gcs, namespace="pdcluster", log_to_driver=False)
    try:
        from ray._private.state import actors

        deadline = time.monotonic() + 60
        while True:  # read from the GCS (no dashboard on this cluster)
            alive = [
                a["ActorClassName"]
                for a in actors().values()
                if a["State"] != "DEAD"
                and (
                    "pdcluster" in a["ActorClassName"]
                    or a["ActorClassName"] in ("PrefillWorker", "DecodeWorker", "RankWorker")
                )
            ]
            pgs = [
                p["name"]
                for p in ray.util.placement_group_table().values()
                if p["state"] != "REMOVED"
            ]
            if not alive and not pgs:
                break
            assert time.monotonic() < deadline, (alive, pgs)
            time.sleep(1)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 3
        other_app = httpx.get(f"http://127.0.0.1:{cfg.router.port}/other", timeout=30)
        assert other_app.status_code == 200 and other_app.text == "still here"
    finally:
        ray.shutdown()
