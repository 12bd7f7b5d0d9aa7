"""`pdcluster up` joining a Ray cluster someone else started (`ray start`): a head and
two worker nodes carrying the prefill/decode resources, each node with its own temp
dir and its own model cache. Every worker resolves the model on its own node; the
tiny model answers over HTTP with Hugging Face's greedy text; shutting pdcluster down
leaves the external cluster running and clean (no pdcluster actors or placement
groups). The external cluster's processes are stopped by pid at the end."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support import greedy_completion, hf_greedy, load_test_config, running_cluster

RAY = str(Path(sys.executable).with_name("ray"))
# The external cluster runs without Ray's token authentication, whatever this machine holds:
# with RAY_AUTH_MODE unset, `ray start --head` turns it on when ~/.ray/auth_token exists
# (any earlier `ray.init()` that started a cluster writes one), while `ray start --address`
# and the job client here send no token: every other node's start-up then fails.
NO_TOKEN = {"RAY_AUTH_MODE": "disabled"}

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


def _kill(pids: list[int]) -> list[int]:
    """SIGKILL each of `pids` still there; returns them."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def _ray_start(cmd: list[str], env: dict, node_dir: Path) -> None:
    """`ray start` one node of the external cluster, and once more if that fails (its
    processes killed first): Ray gives a new node 30 s, not configurable, to register with
    the GCS, which a loaded two-core machine can pass; a port Ray picked can be taken
    meanwhile. A second failure fails the test with both of Ray's messages."""
    errors = []
    for _ in range(2):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        if r.returncode == 0:
            if errors:
                print(f"ray start {node_dir.name} failed once, then started:\n{errors[0]}")
            return
        errors.append((r.stdout + r.stderr)[-3000:])
        _kill(_cluster_pids(node_dir, -1))
        time.sleep(2)
    raise AssertionError(f"{' '.join(cmd[1:])} failed twice:\n" + "\n---\n".join(errors))


@pytest.fixture(scope="module")
def external():
    # A short path: Ray's Unix sockets live under the temp dir (107-byte limit).
    base = Path(tempfile.mkdtemp(prefix="pdx-", dir="/tmp"))
    port, client_port = _free_port(), _free_port()
    gcs = f"127.0.0.1:{port}"
    env = {
        **os.environ,
        **NO_TOKEN,
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
            _ray_start(
                [
                    RAY,
                    "start",
                    *args,
                    *common,
                    f"--temp-dir={base / f'ray-{name}'}",
                    f"--resources={json.dumps({resource: 1})}",
                ],
                {**env, "PDCLUSTER_CACHE": str(base / f"cache-{name}")},
                base / f"ray-{name}",
            )
        yield gcs, base
    finally:
        pids = _kill(_cluster_pids(base, client_port))
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


class _Router(http.server.BaseHTTPRequestHandler):
    """Stands in for pdcluster's router behind the head's Serve proxy: /health is 503
    until the test says the cluster serves."""

    serving = threading.Event()

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200 if self.serving.is_set() else 503)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_kuberay_bootstrap_retries_every_failure_until_the_router_answers(monkeypatch):
    """cluster/kuberay.py's `pdcluster-up` on a head whose dashboard is not up yet (a
    ConnectionError, not a RuntimeError) and whose drivers end at once (the entrypoint is
    not there: a real Ray job that FAILED): its constructor keeps retrying and returns
    once the router answers. It must never raise: Serve gives up on a deployment whose
    constructor failed three times, and KubeRay does not re-send an unchanged config."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from cluster import kuberay

    base = Path(tempfile.mkdtemp(prefix="pdk-", dir="/tmp"))
    port, dash_port, client_port = _free_port(), _free_port(), _free_port()
    dashboard = f"http://127.0.0.1:{dash_port}"
    _Router.serving.clear()
    router = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Router)
    threading.Thread(target=router.serve_forever, daemon=True).start()
    monkeypatch.setattr(kuberay, "DASHBOARD", dashboard)
    monkeypatch.setattr(kuberay, "HEALTH", f"http://127.0.0.1:{router.server_port}/health")
    monkeypatch.setattr(kuberay, "RETRY_S", 0.5, raising=False)
    out: dict = {}

    def construct():
        try:
            out["app"] = kuberay.PdclusterUp.func_or_class()
        except BaseException as e:  # noqa: BLE001 - what the test looks for
            out["error"] = e

    bootstrap = threading.Thread(target=construct, daemon=True)
    bootstrap.start()
    try:
        time.sleep(3)  # a few tries at a dashboard nobody listens on yet
        assert "error" not in out, f"the constructor raised {out['error']!r}"
        subprocess.run(
            [
                RAY,
                "start",
                "--head",
                f"--port={port}",
                f"--ray-client-server-port={client_port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash_port}",
                # Job submission goes through the head's dashboard agent, whose HTTP port is
                # 52365 by default: taken when another Ray cluster runs on this machine (this
                # module's own external cluster does), and then no job ever runs.
                f"--dashboard-agent-listen-port={_free_port()}",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=0",
                "--disable-usage-stats",
                f"--temp-dir={base / 'ray'}",
            ],
            env={**os.environ, **NO_TOKEN, "RAY_USAGE_STATS_ENABLED": "0"},
            check=True,
            capture_output=True,
            timeout=180,
        )
        jobs = JobSubmissionClient(dashboard)
        deadline = time.monotonic() + 120
        while True:  # two drivers submitted and ended: each end was retried
            ended = [
                j
                for j in jobs.list_jobs()
                if (j.metadata or {}).get("pdcluster") == "up" and j.status == JobStatus.FAILED
            ]
            if len(ended) >= 2:
                break
            assert "error" not in out, f"the constructor raised {out['error']!r}"
            assert time.monotonic() < deadline, "no driver was submitted again"
            time.sleep(0.5)
        _Router.serving.set()
        bootstrap.join(60)
        assert "app" in out, out.get("error", "still waiting 60 s after the router answered")
        assert out["app"].job in {j.submission_id for j in jobs.list_jobs()}
    finally:
        # A constructor still running (the test failed) returns: nothing left to keep,
        # and the router answers.
        monkeypatch.setattr(kuberay.PdclusterUp.func_or_class, "_keep_driver", lambda self: None)
        _Router.serving.set()
        bootstrap.join(10)
        router.shutdown()
        _kill(_cluster_pids(base, client_port))
        shutil.rmtree(base, ignore_errors=True)
