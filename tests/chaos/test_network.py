"""The network scenarios, short, as a user runs them: `pdcluster chaos CONFIG --testbed`
starts the tiny-model cluster of configs/chaos.yaml (2 prefill + 2 decode) on a testbed
of network namespaces (a host per node, the head on its own, KV over UCX's TCP between
them) and cuts links under load. Each scenario must meet its thresholds (success rate,
none hung, none corrupted, recovery, nothing leaked) and, after the heal, every view of
who is alive (Ray's, the router's, the workers') must agree with no process from before
a node's death still running. The run must leave no namespace, process or file; so must
`pdcluster testbed down` after a `testbed up` killed midway."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from chaos import testbed
from chaos.config import load_chaos_config
from chaos.scenarios import SCENARIOS
from chaos.testbed_ray import RayTestbed
from tests.support import ROOT, _merge, needs_netns

pytestmark = needs_netns

# Every network scenario but isolate-prefill-node (isolate-decode-node's twin) and the 3 s
# cut-prefill-decode (its for-good version makes the same cut, for longer), for time;
# `pdcluster chaos --testbed` runs them all.
LEFT_OUT = ("isolate-prefill-node", "cut-prefill-decode")
NETWORK = [n for n, s in SCENARIOS.items() if s.network and n not in LEFT_OUT]
SHORT = {
    "router": {"port": 8024},
    "chaos": {
        "baseline_s": 6,
        "warmup_s": 3,
        "node_down_s": 3,
        # As in test_scenarios.py: 60 s on these shared cores (20 s in configs/chaos.yaml).
        "thresholds": {"max_recovery_s": 60},
        "testbed": {"name": "ct", "subnet": "10.231.17.0/24", "dead_after_s": 9, "partition_s": 3},
    },
}
CLI = [sys.executable, "-m", "pdcluster.cli"]


def _config(path: Path, over: dict) -> Path:
    data = yaml.safe_load((ROOT / "configs" / "chaos.yaml").read_text())
    path.write_text(yaml.safe_dump(_merge(data, over)))
    return path


def _left(name: str) -> dict:
    """What testbed `name` left on the machine: namespaces, processes (every process the
    testbed starts carries PDCLUSTER_TESTBED=<name> in its environment, Ray's workers
    too, whatever they call themselves), the temp dir, the state file."""
    prefix = f"{testbed.PREFIX}{name}-"
    procs = []
    for p in psutil.process_iter(["name", "status"]):
        try:
            mine = p.environ().get("PDCLUSTER_TESTBED") == name
        except psutil.Error:
            continue
        if mine and p.info["status"] != psutil.STATUS_ZOMBIE:
            procs.append((p.pid, p.info["name"]))
    tmp = Path("/tmp") / f"{prefix}ray"
    return {
        "namespaces": [n for n in testbed.namespaces() if n.startswith(prefix)],
        "processes": procs,
        "dirs": [str(tmp)] if tmp.exists() else [],
        "state": [str(p) for p in testbed.STATE_DIR.glob(f"{name}.json")],
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("testbed-chaos")
    cfg = _config(out / "chaos.yaml", SHORT)
    argv = [*CLI, "chaos", str(cfg), "--testbed", "--seed", "1", "--out", str(out / "report")]
    for name in NETWORK:
        argv += ["--scenario", name]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=ROOT)
        print(p.stdout[-6000:], p.stderr[-3000:])
        report = json.loads((out / "report" / "report.json").read_text())
        yield p, {s["name"]: s for s in report["scenarios"]}, out / "report"
    finally:
        testbed.remove("ct")


@pytest.mark.parametrize("name", NETWORK)
def test_network_scenario_meets_its_thresholds(run, name):
    _, scenarios, _ = run
    s = scenarios[name]
    assert s["skipped"] is None, s["skipped"]
    assert s["passed"], (s["failures"], s["errors"], s["target"])
    assert s["sent"] > 0 and s["hung"] == 0 and s["corrupted"] == 0 and not s["leaked"]
    # After the heal: every view agrees, and nothing from before a fenced node still runs.
    assert s["views_agree_s"] is not None and s["stale"] == []


def test_a_node_cut_from_the_head_is_declared_dead_and_its_old_processes_are_fenced(run):
    """Ray declares the cut node dead (its GCS then refuses it); after the heal its old
    raylet and workers are gone, the node rejoins as a new one and its replica is placed
    there again, and the router serves through it (every replica healthy)."""
    _, scenarios, _ = run
    s = scenarios["cut-decode-from-head"]
    assert "Ray declared it dead" in s["target"], s["target"]
    assert s["fenced"] >= 2 and s["stale"] == [], s  # at least the raylet and the worker
    assert s["healthy_again_s"] is not None


def test_the_run_passes_writes_its_report_and_leaves_nothing(run):
    p, scenarios, report = run
    assert p.returncode == 0, p.stdout[-3000:]
    assert "PASS" in p.stdout
    md = (report / "report.md").read_text()
    for name in NETWORK:
        png = report / scenarios[name]["timeline"]
        assert f"| {name} |" in md and png.read_bytes()[:4] == b"\x89PNG"
    assert _left("ct") == {"namespaces": [], "processes": [], "dirs": [], "state": []}


def test_testbed_down_after_testbed_up_was_killed_midway(tmp_path):
    """While `pdcluster testbed up` runs, `testbed down` refuses to remove its testbed
    (without --force). SIGKILL it once Ray runs in every namespace (before pdcluster is
    up): `pdcluster testbed down` then removes every namespace, process and file it made,
    and a second `down` has nothing left to do."""
    bed = {"name": "ck", "subnet": "10.231.18.0/24"}
    over = {"chaos": {"testbed": bed}, "router": {"port": 8025}}
    cfg = _config(tmp_path / "chaos.yaml", over)
    up = subprocess.Popen([*CLI, "testbed", "up", str(cfg)], cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    pids: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        hosts = [f"{testbed.PREFIX}ck-{i}" for i in range(5)]  # the head and 4 nodes
        while time.monotonic() < deadline:
            inside = {h: set(testbed.Testbed.pids_in(h) or []) - {up.pid} for h in hosts}
            if all(inside.values()) and len(_left("ck")["processes"]) >= 5:
                pids = set().union(*inside.values())
                break
            assert up.poll() is None, "testbed up ended before Ray was up"
            time.sleep(0.5)
        else:
            raise AssertionError(f"Ray not up in every namespace: {_left('ck')}")
        busy = subprocess.run([*CLI, "testbed", "down", str(cfg)], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert busy.returncode == 1 and "in use" in busy.stderr, (busy.stdout, busy.stderr)
        assert len(_left("ck")["namespaces"]) == 6 and up.poll() is None
        up.send_signal(signal.SIGKILL)
        up.wait(10)
        assert _left("ck")["namespaces"]  # the kill left it all behind
        down = subprocess.run([*CLI, "testbed", "down", str(cfg)], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert down.returncode == 0, down.stderr
        assert "(6 namespaces)" in down.stdout, down.stdout  # 5 hosts and the bridge
        assert _left("ck") == {"namespaces": [], "processes": [], "dirs": [], "state": []}
        assert not [p for p in pids if psutil.pid_exists(p) and _alive(p)]
        again = subprocess.run([*CLI, "testbed", "down", str(cfg)], cwd=ROOT, capture_output=True,
                               text=True, timeout=60)  # fmt: skip
        assert again.returncode == 0 and "(0 namespaces)" in again.stdout, again.stdout
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
        testbed.remove("ck")


@contextlib.contextmanager
def running_testbed(cfg: Path, name: str):
    """`pdcluster testbed up CFG` as a fixture: yields (its process, the router's URL, the
    head's namespace) once it serves; SIGTERM at the end, which must stop it with status
    0 and leave nothing behind."""
    up = subprocess.Popen([*CLI, "testbed", "up", str(cfg)], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 180
        url = None
        while url is None and time.monotonic() < deadline:
            line = up.stdout.readline()
            if not line:
                raise AssertionError("testbed up ended:\n" + "".join(lines[-40:]))
            lines.append(line)
            if line.startswith("pdcluster: serving"):
                url = line.split(" at ")[1].split()[0]
        assert url, "".join(lines[-40:])
        reader = threading.Thread(target=lambda: lines.extend(up.stdout), daemon=True)
        reader.start()
        yield up, url, f"{testbed.PREFIX}{name}-0"
        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0, "".join(lines[-40:])
        reader.join(10)
        assert not any("Traceback" in x for x in lines), "".join(lines[-40:])
        assert _left(name) == {"namespaces": [], "processes": [], "dirs": [], "state": []}
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
        testbed.remove(name, force=True)


# An OpenAI client in the head's namespace (the router's address is reachable from there
# only): one greedy request; then, once the router's polls of the workers show as many as
# asked for, the KV pulls and the pulls that timed out or failed since the start; and
# whether every count of /debug/state is back at zero (tests.support.assert_idle).
CLIENT = """
import sys
import time
import httpx
from openai import OpenAI
from tests.support import assert_idle
url, want_pulls, want_failed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
r = c.completions.create(model="tiny-llama", prompt="hello across the bridge " * 8, max_tokens=8,
                         temperature=0)
def count(*names):
    lines = httpx.get(url + "/metrics").text.splitlines()
    return sum(float(x.split()[-1]) for x in lines for n in names if x.startswith(n + "{"))
pulls = failed = 0
for _ in range(40):  # the workers' counts, as of the router's last poll of them
    pulls = count("pdcluster_kv_transfer_seconds_count")
    failed = count("pdcluster_kv_transfer_timeouts_total", "pdcluster_kv_transfer_failures_total")
    if pulls >= want_pulls and failed >= want_failed:
        break
    time.sleep(0.25)
assert_idle(url)
print(r.usage.completion_tokens, r.choices[0].finish_reason, int(pulls), int(failed))
"""


# Exits 0 once the router's polls show a KV pull that timed out or failed, 1 if none
# within argv[2] seconds.
FAILED_PULL = """
import sys, time, httpx
url, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
names = ("pdcluster_kv_transfer_timeouts_total{", "pdcluster_kv_transfer_failures_total{")
while time.monotonic() < deadline:
    lines = httpx.get(url + "/metrics").text.splitlines()
    if sum(float(x.split()[-1]) for x in lines if x.startswith(names)):
        sys.exit(0)
    time.sleep(0.2)
sys.exit(1)
"""


def test_testbed_up_serves_inside_its_namespace_and_a_sigterm_removes_it(tmp_path):
    """The router answers the official client in the head's namespace, its KV pulled over
    TCP from a prefill host; the machine's own namespace holds nothing of the testbed's
    range. Then every prefill host and every decode host drop each other's packets
    (silently: nothing refuses) until a pull of a request has failed (its claim, a Ray
    call across the cut, ends by `transfer.timeout_s`; no heal comes to end it): the
    request is prefilled again, and after the heal it completes with nothing left held.
    SIGTERM stops it all (status 0, no namespace, process or file left)."""
    bed = {"name": "cu", "subnet": "10.231.19.0/24"}
    cfg = _config(tmp_path / "chaos.yaml", {"chaos": {"testbed": bed}, "router": {"port": 8026}})
    with running_testbed(cfg, "cu") as (up, url, head):
        assert url == "http://10.231.19.1:8026"

        def client(want_pulls: int, want_failed: int) -> subprocess.Popen:
            argv = [sys.executable, "-c", CLIENT, url, str(want_pulls), str(want_failed)]
            return subprocess.Popen(["ip", "netns", "exec", head, *argv], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip

        out, err = client(1, 0).communicate(timeout=120)
        assert out.split() == ["8", "length", "1", "0"], (out, err[-2000:])  # 1 pull, over TCP
        # The machine's own namespace has no address or route in the testbed's range (no
        # packet is sent to find out: a proxy on the default route may answer anything).
        own = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
        own += subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
        assert "10.231.19." not in own, own

        tb = RayTestbed(load_chaos_config(cfg))  # its hosts, to cut (nothing started)
        prefill = [tb.host(n) for n in tb.nodes if n.startswith("prefill")]
        decode = [tb.host(n) for n in tb.nodes if n.startswith("decode")]
        assert len(prefill) == len(decode) == 2
        for p in prefill:
            for d in decode:
                tb.cut(p, d)
        run = client(2, 1)
        # Healed only once a pull has ended while the cut lasts (its claim, a Ray call from
        # decode to prefill, is the first wait that crosses it), within 5 deadlines of it.
        wait = [sys.executable, "-c", FAILED_PULL, url, str(tb.cfg.transfer.timeout_s * 5)]
        ended = subprocess.run(["ip", "netns", "exec", head, *wait], capture_output=True,
                               text=True, timeout=60, cwd=ROOT)  # fmt: skip
        for p in prefill:
            for d in decode:
                tb.cut(p, d, on=False)
        assert ended.returncode == 0, (ended.stdout, ended.stderr[-2000:])
        out, err = run.communicate(timeout=120)
        tokens, finish, pulls, failed = out.split()
        assert (tokens, finish) == ("8", "length") and int(failed) >= 1, (out, err[-2000:])
        assert int(pulls) >= 2  # the first one and the one that brought the KV after the heal


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
