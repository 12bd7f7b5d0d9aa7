"""deploy/: every file parses; the RayService validates against KubeRay's CRD schema
(vendored, deploy/kuberay/crd/) with unknown fields refused as `kubectl apply` with
strict field validation refuses them; the pdcluster config in its ConfigMap passes
`pdcluster check-config`; its serveConfigV2 passes Ray Serve's schema and its app
imports; API keys are on in both manifests (the keys file the config names is the one
the head gets, /health and /metrics stay open); the Grafana dashboard queries only
pdcluster's and vLLM's (`vllm:`) metric names, its panels laid out without overlap
(that the names exist in a live /metrics is checked in tests/e2e/test_router_faults.py)."""

from __future__ import annotations

import copy
import json
import os
import posixpath
import stat
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.support import ROOT, dashboard_metrics

DEPLOY = ROOT / "deploy"
CRD = DEPLOY / "kuberay" / "crd" / "ray.io_rayservices.yaml"


def _docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kind(kind: str, file: str = "rayservice.yaml") -> dict:
    return next(d for d in _docs(DEPLOY / "kuberay" / file) if d["kind"] == kind)


def _strict(schema: dict) -> dict:
    """The CRD's OpenAPI schema as JSON Schema with unknown fields refused (Kubernetes
    prunes or, with strict field validation, rejects them)."""
    s = dict(schema)
    if "properties" in s and not s.get("x-kubernetes-preserve-unknown-fields"):
        s.setdefault("additionalProperties", False)
    for key in ("properties",):
        if key in s:
            s[key] = {k: _strict(v) for k, v in s[key].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(s.get(key), dict):
            s[key] = _strict(s[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [_strict(v) for v in s[key]]
    return s


@pytest.fixture(scope="module")
def rayservice_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    assert crd["spec"]["names"]["kind"] == "RayService"
    v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _strict(v1["schema"]["openAPIV3Schema"])


def test_every_deploy_file_parses():
    files = [p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml", ".json")]
    assert len(files) >= 5
    for p in files:
        if p.suffix == ".json":
            json.loads(p.read_text())
        else:
            assert _docs(p), p


def test_rayservice_validates_against_the_kuberay_crd(rayservice_schema):
    rs = _kind("RayService")
    assert rs["apiVersion"] == "ray.io/v1"
    jsonschema.validate(rs, rayservice_schema)
    groups = {g["groupName"]: g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert set(groups) == {"prefill", "decode"}
    for role, g in groups.items():
        assert f"{role}_node" in g["rayStartParams"]["resources"]
        gpus = g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        assert int(gpus) == 1  # tensor_parallel_size in the ConfigMap's config
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]
    assert "pdcluster_head" in head["resources"]


def test_the_head_installs_the_edge_bounds_in_serves_proxy():
    """KubeRay starts Serve, not `pdcluster up`: the head's environment names the proxy
    callback that installs cluster/edge.py, and that callback imports and installs."""
    import importlib

    import uvicorn.config

    rs = _kind("RayService")
    spec = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    module, _, fn = env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"].partition(":")
    auto = uvicorn.config.HTTP_PROTOCOLS["auto"]
    try:
        assert getattr(importlib.import_module(module), fn)() == []
        assert uvicorn.config.HTTP_PROTOCOLS["auto"] == "cluster.edge:EdgeProtocol"
    finally:
        uvicorn.config.HTTP_PROTOCOLS["auto"] = auto


def test_the_schema_check_can_fail(rayservice_schema):
    rs = copy.deepcopy(_kind("RayService"))
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replica"] = 2  # typo of replicas
    with pytest.raises(jsonschema.ValidationError, match="replica"):
        jsonschema.validate(rs, rayservice_schema)
    rs = copy.deepcopy(_kind("RayService"))
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rs, rayservice_schema)


def test_configmap_config_passes_check_config(tmp_path):
    from pdcluster.cli import main

    text = _kind("ConfigMap")["data"]["cluster.yaml"]
    (tmp_path / "cluster.yaml").write_text(text)
    assert main(["check-config", str(tmp_path / "cluster.yaml")]) == 0
    cfg = yaml.safe_load(text)
    assert cfg["cluster"]["address"] == "auto" and cfg["model"]["cache_dir"]
    assert cfg["prefill"]["tensor_parallel_size"] == 1
    # /debug/state (pids, node ids, every worker's state) stays off on a router that
    # listens on 0.0.0.0: deploy/README.md says how to reach it safely when needed.
    assert cfg["router"]["host"] == "0.0.0.0" and not cfg["router"].get("debug_state", False)


def test_kuberay_router_reads_its_keys_from_the_secret_the_head_mounts(tmp_path):
    """router.api_keys_file is a file of the Secret's volume on the head pod (where the
    router runs), mounted read-only; /health stays open, as pdcluster-up waits on it
    without a key; the Secret as shipped holds no key, so it cannot serve behind a key
    printed in this repository."""
    from cluster import auth, kuberay
    from cluster.config import RouterConfig

    secret = _kind("Secret", "api-keys.yaml")
    rs = _kind("RayService")
    router = yaml.safe_load(_kind("ConfigMap")["data"]["cluster.yaml"])["router"]
    assert not router.get("api_keys") and not router.get("auth_health_metrics", False)
    assert kuberay.HEALTH.endswith("/health")
    keys_file = router["api_keys_file"]
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    (container,) = head["containers"]
    volumes = {v["name"]: v for v in head["volumes"]}
    mounts = [
        m
        for m in container["volumeMounts"]
        if volumes[m["name"]].get("secret", {}).get("secretName") == secret["metadata"]["name"]
    ]
    assert len(mounts) == 1 and mounts[0]["readOnly"] is True and "subPath" not in mounts[0]
    assert posixpath.dirname(keys_file) == mounts[0]["mountPath"]
    assert posixpath.basename(keys_file) in secret["stringData"]
    assert volumes[mounts[0]["name"]]["secret"]["defaultMode"] & 0o007 == 0  # not world-readable
    for group in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]:  # no router there
        assert not any("secret" in v for v in group["template"]["spec"].get("volumes", []))
    # No probe of this file aims at a route that would ask for a key.
    for c in [container] + [
        g["template"]["spec"]["containers"][0]
        for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    ]:
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if get := c.get(probe, {}).get("httpGet"):
                assert get["path"] == "/health", (c["name"], probe)
    (text,) = secret["stringData"].values()
    (tmp_path / "keys.txt").write_text(text)
    with pytest.raises(ValueError, match="holds no key"):
        auth.load_keys(RouterConfig(api_keys_file=str(tmp_path / "keys.txt")))


def test_serve_config_passes_serve_schema_and_its_app_builds():
    from ray.serve.schema import ServeDeploySchema

    serve_cfg = yaml.safe_load(_kind("RayService")["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)
    (app,) = serve_cfg["applications"]
    module, attr = app["import_path"].split(":")
    from ray.serve.deployment import Application

    mod = __import__(module, fromlist=[attr])
    assert isinstance(getattr(mod, attr), Application)


def test_ray_up_nodes_carry_the_role_resources():
    cfg = _docs(DEPLOY / "ray-up" / "cluster.yaml")[0]
    text = json.dumps(cfg)
    for res in ("pdcluster_head", "prefill_node", "decode_node"):
        assert res in text, res
    assert "torch==2.13.0" in text and "constraints.txt" in text


def test_ray_up_head_writes_a_keys_file_and_a_config_that_names_it(tmp_path, monkeypatch):
    """The head's setup commands, in a scratch home (the project's venv standing in for
    ~/pdcluster/.venv): a keys file of mode 600 with one key, kept as it is on a re-run,
    and a config that passes check-config and whose router reads that key."""
    from cluster import auth
    from cluster.config import RouterConfig

    cfg = _docs(DEPLOY / "ray-up" / "cluster.yaml")[0]
    venv_bin = tmp_path / "pdcluster" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    for tool in ("python", "pdcluster"):
        (venv_bin / tool).symlink_to(Path(sys.executable).parent / tool)
    monkeypatch.delenv(auth.KEYS_FILE_ENV, raising=False)
    env = {**os.environ, "HOME": str(tmp_path)}

    def setup():
        for cmd in cfg["head_setup_commands"]:
            subprocess.run(["bash", "-c", cmd], env=env, cwd=tmp_path, check=True, timeout=120)

    setup()
    keys_file = tmp_path / ".pdcluster" / "api-keys.txt"
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    router = yaml.safe_load((tmp_path / "pdcluster.yaml").read_text())["router"]
    assert router["host"] == "0.0.0.0" and router["api_keys_file"] == str(keys_file)
    (key,) = auth.load_keys(RouterConfig(api_keys_file=router["api_keys_file"]))
    assert len(key) >= 32
    keys_file.write_text("mine-not-generated\n")  # the operator's own (or rotated) keys
    setup()
    assert keys_file.read_text() == "mine-not-generated\n"


def test_dashboard_has_the_panels_asked_for():
    names = dashboard_metrics()
    for needed in (
        "pdcluster_time_to_first_token_seconds_bucket",
        "pdcluster_time_per_output_token_seconds_bucket",
        "pdcluster_requests_total",
        "pdcluster_requests_in_flight",
        "pdcluster_kv_blocks_used",
        "pdcluster_kv_transfer_seconds_bucket",
        "pdcluster_kv_transfer_bytes_total",
        "pdcluster_kv_leases",
        "pdcluster_kv_transfer_timeouts_total",
        "pdcluster_kv_leases_expired_total",
        "pdcluster_retries_total",
        "pdcluster_migrations_total",
        "pdcluster_workers_healthy",
        "pdcluster_worker_restarts_total",
        # vLLM's own dashboard's panels, on vLLM's names (cluster/metrics.py)
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:request_queue_time_seconds_bucket",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:num_preemptions_total",
    ):
        assert needed in names, needed
    assert all(n.startswith(("pdcluster_", "vllm:")) for n in names), names
    dash = json.loads((DEPLOY / "grafana" / "pdcluster.json").read_text())
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), ids
    for p in panels:
        for t in [p, *p.get("targets", [])]:
            if p["type"] != "row":
                assert t["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p
    cells = {}
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, (p["title"], cells[x, y])
                cells[x, y] = p["title"]
    prom = _docs(DEPLOY / "prometheus" / "prometheus.yml")[0]
    assert any(j.get("metrics_path", "/metrics") == "/metrics" for j in prom["scrape_configs"])


def test_the_image_copies_every_package_the_project_installs():
    """`pip install .` in the image builds the packages pyproject lists: each must be
    copied into the build, or the image build fails (it did, twice, when packages were
    added)."""
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    copied = {
        line.split()[1].rstrip("/") for line in dockerfile.splitlines() if line.startswith("COPY ")
    }
    assert set(packages) <= copied, sorted(set(packages) - copied)
