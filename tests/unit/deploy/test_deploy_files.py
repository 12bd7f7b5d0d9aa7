"""deploy/: every file parses; the RayService validates against KubeRay's CRD schema
(vendored, deploy/kuberay/crd/) with unknown fields refused as `kubectl apply` with
strict field validation refuses them; the pdcluster config in its ConfigMap passes
`pdcluster check-config`; its serveConfigV2 passes Ray Serve's schema and its app
imports; the Grafana dashboard queries only pdcluster metrics (that they exist in a
live /metrics is checked in tests/e2e/test_router_faults.py)."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest
import yaml

from tests.support import ROOT, dashboard_metrics

DEPLOY = ROOT / "deploy"
CRD = DEPLOY / "kuberay" / "crd" / "ray.io_rayservices.yaml"


def _docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kind(kind: str) -> dict:
    return next(d for d in _docs(DEPLOY / "kuberay" / "rayservice.yaml") if d["kind"] == kind)


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
    ):
        assert needed in names, needed
    prom = _docs(DEPLOY / "prometheus" / "prometheus.yml")[0]
    assert any(j.get("metrics_path", "/metrics") == "/metrics" for j in prom["scrape_configs"])
