"""Ray and pdcluster on a testbed (chaos/testbed.py): the head in a network namespace of
its own, each configured node in another, so that every Ray call, KV transfer and HTTP
stream between them crosses a network boundary that chaos can cut.

- The head host runs the GCS, the router (Serve) and the driver: `pdcluster testbed up`
  or `pdcluster chaos --testbed` moves its own main thread into the head's namespace
  (`enter`), and every thread and process it starts afterwards is there too.
- Each node runs `ray start --block` under a loop that starts it again `restart_s` after
  it ends, the way a pod's container is restarted: a node whose raylet was killed, or
  that Ray declared dead during a partition (its raylet exits when it hears so after the
  heal), comes back as a new Ray node, and pdcluster places its replicas there again.
- NIXL's UCX is held to TCP on the host's `eth0`: its shared-memory transports would
  move KV between the namespaces' processes without crossing the network, where no
  partition can reach them.
- Ray's GCS declares a node dead after `chaos.testbed.dead_after_s` of failed health
  checks (one a second) instead of its default of about 65 s.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec

from chaos.config import ChaosRunConfig, TestbedConfig, cluster_config
from chaos.testbed import Host, Testbed
from cluster.config import HEAD_RESOURCE, Config, need
from cluster.reaper import proc_stat

HEAD = "head"
GCS_PORT = 6379
_CLONE_NEWNET = 0x40000000
_OBJECT_STORE_BYTES = 256 * 1024**2
RAY = str(Path(sys.executable).with_name("ray"))


def ray_env(tc: TestbedConfig) -> dict[str, str]:
    """The environment of every Ray process on the testbed (and so of every worker)."""
    return {
        "RAY_AUTH_MODE": "disabled",  # the nodes' `ray start --address` carries no token
        "RAY_USAGE_STATS_ENABLED": "0",
        "UCX_TLS": "tcp",
        "UCX_NET_DEVICES": "eth0",
        "GLOO_SOCKET_IFNAME": "eth0",  # tensor-parallel collectives
        "PDCLUSTER_TESTBED": tc.name,  # marks every process of the testbed (leak checks)
        # A failed check takes its period and its timeout (measured: 8 failures at
        # 1 s + 1 s declared a node dead after 16 s): one a second here.
        "RAY_health_check_period_ms": "500",
        "RAY_health_check_timeout_ms": "500",
        "RAY_health_check_failure_threshold": str(tc.dead_after_s),
    }


def enter(netns: str) -> None:
    """Move the calling thread into network namespace `netns` (setns(2)); the threads
    and processes it starts afterwards are there too."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({netns}): {os.strerror(err)}")
    finally:
        os.close(fd)


class RayTestbed:
    """The hosts of `cfg`'s testbed: `head` and one per `cluster.nodes` entry."""

    __test__ = False

    def __init__(self, cfg: ChaosRunConfig):
        self.cfg, self.tc = cfg, cfg.chaos.testbed
        self.nodes = {n.name: n for n in cfg.cluster.nodes}
        for name in self.nodes:  # they name hosts, log files and Ray temp dirs
            need(
                re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", name) is not None and name != HEAD,
                f"cluster.nodes.{name}",
                f"on a testbed, a name of letters, digits, '_', '.', '-', and not {HEAD!r}",
            )
        try:
            self.net = Testbed(self.tc.name, [HEAD, *self.nodes], self.tc.subnet)
        except ValueError as e:
            need(False, "chaos.testbed.subnet", f"room for the head, every node and a bridge ({e})")
        self.head = self.net.hosts[0]
        self.address = f"{self.head.address}:{GCS_PORT}"
        self.dir = Path(tempfile.gettempdir()) / f"{self.net.prefix}ray"
        self.env = {**os.environ, **ray_env(self.tc)}
        self.restart_s = cfg.chaos.node_down_s

    def host(self, name: str) -> Host:
        return next(h for h in self.net.hosts if h.node == name)

    def host_at(self, address: str) -> Host:
        """The host with this address (a Ray node's `NodeManagerAddress`)."""
        return next(h for h in self.net.hosts if h.address == address)

    def cluster_config(self) -> Config:
        """The cluster's config, joining the testbed's Ray and serving on the head's
        address (the only one its clients, inside the testbed, can reach)."""
        cfg = cluster_config(self.cfg)
        return msgspec.structs.replace(
            cfg,
            cluster=msgspec.structs.replace(cfg.cluster, address=self.address),
            router=msgspec.structs.replace(cfg.router, host=self.head.address),
        )

    # ---- up / down -----------------------------------------------------------

    def up(self, timeout: float = 180.0) -> None:
        """Namespaces, the Ray head, every node; returns once Ray sees them all. The
        calling thread is then in the head's namespace. On failure, everything made is
        removed."""
        try:
            self.net.up()
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir(parents=True)
            # Threads that exist now would stay in this namespace, and reach nothing.
            if threading.active_count() > 1:
                raise RuntimeError("enter the head's namespace before starting threads")
            enter(self.head.netns)
            head = subprocess.run(
                [RAY, "start", "--head", f"--port={GCS_PORT}",
                 f"--node-ip-address={self.head.address}", "--num-cpus=1",
                 f"--resources={json.dumps({HEAD_RESOURCE: 1})}",
                 f"--object-store-memory={_OBJECT_STORE_BYTES}", "--include-dashboard=false",
                 "--disable-usage-stats", f"--temp-dir={self.dir / HEAD}"],
                env=self.env, capture_output=True, text=True, timeout=timeout,
            )  # fmt: skip
            if head.returncode != 0:
                raise RuntimeError(f"ray start --head failed:\n{head.stdout}{head.stderr}")
            for name, node in self.nodes.items():
                self._supervise(self.host(name), node)
            self.wait_nodes(len(self.nodes) + 1, timeout)
        except BaseException:
            self.down()
            raise

    def _supervise(self, host: Host, node) -> None:
        argv = [
            RAY, "start", "--block", f"--address={self.address}",
            f"--node-ip-address={host.address}", f"--num-cpus={node.num_cpus}",
            f"--resources={json.dumps(dict(node.resources))}",
            f"--object-store-memory={_OBJECT_STORE_BYTES}", "--disable-usage-stats",
            f"--temp-dir={self.dir / host.node}",
        ]  # fmt: skip
        loop = f"while :; do {shlex.join(argv)}; sleep {self.restart_s}; done"
        with open(self.dir / f"{host.node}.log", "ab") as log:
            self.net.run(
                host, ["sh", "-c", loop], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=self.env, start_new_session=True,
            )  # fmt: skip

    def alive(self) -> dict[str, str]:
        """Ray's view: node id -> address of every node its GCS holds alive."""
        from ray._raylet import GcsClient

        info = GcsClient(address=self.address).get_all_node_info(timeout=5)
        return {
            nid.hex(): n.node_manager_address
            for nid, n in info.items()
            if n.state == 0  # GcsNodeInfo.ALIVE
        }

    def wait_nodes(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        seen: dict = {}
        while time.monotonic() < deadline:
            try:
                seen = self.alive()
                if len(seen) >= count:
                    return
            except Exception:  # noqa: BLE001 - the GCS is still starting
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{len(seen)} of {count} Ray nodes up after {timeout:.0f}s")

    def down(self) -> None:
        """Every process, namespace and file the testbed made (its Ray temp dir too);
        idempotent."""
        self.net.down()

    # ---- faults ----------------------------------------------------------------

    def power(self, host: Host, on: bool) -> None:
        """Every process on `host` SIGKILLed, its restart loop too (a node lost for good),
        or its node started again (unless something runs there already)."""
        if not on:
            self.net.kill_in(host.netns)
        elif self.net.pids_in(host.netns) == []:
            self._supervise(host, self.nodes[host.node])

    @staticmethod
    def started(pids: list[int]) -> list[list]:
        """[pid, start time] of each of `pids` still running (see `still_running`)."""
        return [[p, st[1]] for p in pids if (st := proc_stat(p)) is not None]

    @staticmethod
    def still_running(procs: list[list]) -> list[int]:
        """The pids of `procs` ([pid, start time]) that run still, as the same process."""
        return [p for p, t in procs if (st := proc_stat(p)) is not None and st[1] == t]

    def isolate(self, host: Host, on: bool = True) -> None:
        """`host` cut off from every other host (its link down), or healed."""
        self.net.set_link(host, not on)

    def cut(self, a: Host, b: Host, on: bool = True, both: bool = True) -> None:
        """Drop what `a` sends to `b` (and, with `both`, what `b` sends to `a`)."""
        self.net.drop(a, b, on)
        if both:
            self.net.drop(b, a, on)
