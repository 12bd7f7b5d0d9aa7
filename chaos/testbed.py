"""A testbed of hosts on one machine: a Linux network namespace per node, each with its
own interface and private address on a bridge that lives in a namespace of its own.

Traffic between two nodes then crosses a real network boundary, which can be cut the way
real networks fail (a link down, packets dropped one way by a blackhole route) instead of
only by killing processes. Needs root (CAP_NET_ADMIN) and iproute2.

Everything a testbed makes is named from its prefix (`pdtb-<name>-`) and recorded in a
state file before it is made, so `down` removes all of it (the namespaces, and with them
their links and the bridge; the processes started in them) after any crash, and is
idempotent. Addresses come only from the private subnet the testbed is given, and exist
only inside its namespaces: nothing is added to the machine's own namespace.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

STATE_DIR = Path(os.environ.get("PDCLUSTER_TESTBED_STATE", "/run/pdcluster-testbed"))
PREFIX = "pdtb-"
BRIDGE = "br0"


@dataclass(frozen=True)
class Host:
    node: str  # the configured node's name
    netns: str
    address: str  # its private address, on eth0 in its namespace
    peer: str  # its link's other end, on the bridge


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


def namespaces() -> set[str]:
    """Every network namespace on the machine, by name."""
    out = _ip("-json", "netns", "list", check=False).stdout.strip()
    return {n["name"] for n in json.loads(out)} if out else set()


class Testbed:
    """`nodes` hosts named after configured nodes, on `subnet` (private, at least
    len(nodes) + 2 addresses)."""

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, name: str, nodes: list[str], subnet: str = "10.231.0.0/24"):
        net = ipaddress.ip_network(subnet)
        if not net.is_private:
            raise ValueError(f"testbed subnet {subnet} is not a private range")
        if len(nodes) + 2 > net.num_addresses or len(set(nodes)) != len(nodes):
            raise ValueError(f"{len(nodes)} distinct node names do not fit {subnet}")
        self.name, self.subnet = name, net
        self.prefix = f"{PREFIX}{name}-"
        self.bridge_ns = f"{self.prefix}bridge"
        hosts = list(net.hosts())
        self.hosts = [
            Host(node, f"{self.prefix}{i}", str(hosts[i]), f"p{i}") for i, node in enumerate(nodes)
        ]
        self.state = STATE_DIR / f"{name}.json"

    # ---- up / down -----------------------------------------------------------

    def up(self) -> list[Host]:
        """Make the namespaces, the bridge and one link per host; addresses up."""
        self.down()  # whatever a crashed run left under this name
        self._record()
        _ip("netns", "add", self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "add", BRIDGE, "type", "bridge")
        _ip("-n", self.bridge_ns, "link", "set", BRIDGE, "up")
        _ip("-n", self.bridge_ns, "link", "set", "lo", "up")
        for h in self.hosts:
            _ip("netns", "add", h.netns)
            _ip("link", "add", "eth0", "netns", h.netns, "type", "veth", "peer", "name", h.peer,
                "netns", self.bridge_ns)  # fmt: skip
            _ip("-n", self.bridge_ns, "link", "set", h.peer, "master", BRIDGE, "up")
            _ip("-n", h.netns, "addr", "add", f"{h.address}/{self.subnet.prefixlen}", "dev", "eth0")
            _ip("-n", h.netns, "link", "set", "eth0", "up")
            _ip("-n", h.netns, "link", "set", "lo", "up")
        return self.hosts

    def down(self) -> None:
        """Remove everything this testbed's name made: processes started in its
        namespaces, then the namespaces (their links and bridge go with them), then its
        state file. Safe to call at any time, any number of times."""
        remove(self.name)

    def _record(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self.state.write_text(
            json.dumps({"name": self.name, "prefix": self.prefix, "subnet": str(self.subnet)})
        )

    @staticmethod
    def kill_in(ns: str) -> None:
        """SIGKILL every process whose network namespace is `ns` (`ip netns pids`), but
        this one (a driver that entered the namespace)."""
        for _ in range(20):
            pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
            pids = [p for p in pids if p != os.getpid()]
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)

    # ---- use -------------------------------------------------------------------

    def run(self, host: Host, argv: list[str], **popen) -> subprocess.Popen:
        """Start `argv` inside `host`'s namespace."""
        return subprocess.Popen(["ip", "netns", "exec", host.netns, *argv], **popen)

    def set_link(self, host: Host, up: bool) -> None:
        """Cut `host` off from every other host (its link down), or heal it."""
        _ip("-n", host.netns, "link", "set", "eth0", "up" if up else "down")

    def blackhole(self, host: Host, dst: Host, on: bool = True) -> None:
        """Drop what `host` sends to `dst` (one way: `dst` can still send to `host`)."""
        _ip("-n", host.netns, "route", "add" if on else "del", "blackhole", f"{dst.address}/32",
            check=on)  # fmt: skip


def leftovers() -> list[str]:
    """Namespaces any testbed left on the machine."""
    return sorted(n for n in namespaces() if n.startswith(PREFIX))


def remove(name: str | None = None) -> int:
    """Remove testbed `name` (every testbed when None) as `Testbed.down` does, from what
    is on the machine alone: its namespaces, their processes, its state file and its Ray
    temp dir. How many namespaces it removed."""
    import shutil
    import tempfile

    prefix = f"{PREFIX}{name}-" if name else PREFIX
    found = [n for n in namespaces() if n.startswith(prefix)]
    for ns in sorted(found):
        Testbed.kill_in(ns)
        _ip("netns", "del", ns, check=False)
    for f in STATE_DIR.glob(f"{name or '*'}.json"):
        f.unlink(missing_ok=True)
    for d in Path(tempfile.gettempdir()).glob(f"{prefix}*ray"):
        shutil.rmtree(d, ignore_errors=True)
    return len(found)
