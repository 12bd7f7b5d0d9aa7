"""A testbed of hosts on one machine: a Linux network namespace per node, each with its
own interface and private address on a bridge that lives in a namespace of its own.

Traffic between two nodes then crosses a real network boundary, which can be cut the way
real networks fail (a link down; packets dropped silently, one way or both) instead of
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
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.reaper import proc_stat

STATE_DIR = Path(os.environ.get("PDCLUSTER_TESTBED_STATE", "/run/pdcluster-testbed"))
PREFIX = "pdtb-"
BRIDGE = "br0"
# A locally administered MAC that no interface owns: frames sent to it cross the bridge
# and every host drops them, so a sender told to use it for a peer loses its packets the
# way a lossy link does (no error, no refusal). A blackhole route would not do: the
# sender's own kernel refuses it at once (connect() fails with EINVAL), which no real
# partition does.
NOWHERE = "02:00:00:00:00:00"
_removing = threading.Lock()  # one removal at a time (a stop's and a failed start's)


@dataclass(frozen=True)
class Host:
    node: str  # the configured node's name
    netns: str
    address: str  # its private address, on eth0 in its namespace
    peer: str  # its link's other end, on the bridge


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


def usable(net) -> bool:
    """A private IPv4 range that can carry traffic between namespaces (not loopback,
    link-local, reserved or unspecified)."""
    return (
        net.version == 4
        and net.is_private
        and not (net.is_loopback or net.is_link_local or net.is_reserved or net.is_unspecified)
    )


def namespaces() -> set[str]:
    """Every network namespace on the machine, by name."""
    out = _ip("-json", "netns", "list", check=False).stdout.strip()
    return {n["name"] for n in json.loads(out)} if out else set()


class Testbed:
    """`nodes` hosts named after configured nodes, on `subnet` (private, at least
    len(nodes) + 2 addresses)."""

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, name: str, nodes: list[str], subnet: str = "10.231.0.0/24"):
        if not re.fullmatch(r"[a-z0-9]{1,8}", name):
            raise ValueError(f"testbed name {name!r}: 1-8 lowercase letters and digits")
        net = ipaddress.ip_network(subnet)
        if not usable(net):
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
        # Once `down` has begun, nothing more is made or started (a stop that comes while
        # `up` runs on another thread must not miss what `up` makes after it looked).
        self._lock = threading.Lock()
        self.closed = False

    # ---- up / down -----------------------------------------------------------

    def up(self) -> list[Host]:
        """Make the namespaces, the bridge and one link per host; addresses up. Refused
        while another live process owns a testbed of this name."""
        owner = _owner(self.name)
        if owner is not None:
            raise RuntimeError(
                f"testbed {self.name!r} is in use by pid {owner}; stop it, or "
                f"`pdcluster testbed down --force`"
            )
        remove(self.name)  # whatever a crashed run left under this name
        self._record()
        self._make("netns", "add", self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "add", BRIDGE, "type", "bridge")
        _ip("-n", self.bridge_ns, "link", "set", BRIDGE, "up")
        _ip("-n", self.bridge_ns, "link", "set", "lo", "up")
        for h in self.hosts:
            self._make("netns", "add", h.netns)
            _ip("link", "add", "eth0", "netns", h.netns, "type", "veth", "peer", "name", h.peer,
                "netns", self.bridge_ns)  # fmt: skip
            _ip("-n", self.bridge_ns, "link", "set", h.peer, "master", BRIDGE, "up")
            _ip("-n", h.netns, "addr", "add", f"{h.address}/{self.subnet.prefixlen}", "dev", "eth0")
            _ip("-n", h.netns, "link", "set", "eth0", "up")
            _ip("-n", h.netns, "link", "set", "lo", "up")
        return self.hosts

    def _make(self, *args: str) -> None:
        with self._lock:
            if self.closed:
                raise RuntimeError(f"testbed {self.name!r} is being removed")
            _ip(*args)

    def down(self) -> None:
        """Remove everything this testbed's name made: processes started in its
        namespaces, then the namespaces (their links and bridge go with them), then its
        state file. Safe to call at any time, from any thread, any number of times."""
        with self._lock:
            self.closed = True
        remove(self.name, force=True)

    def _record(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        me = os.getpid()
        self.state.write_text(
            json.dumps(
                {
                    "name": self.name,
                    "prefix": self.prefix,
                    "subnet": str(self.subnet),
                    "pid": me,
                    "started": proc_stat(me)[1],
                }
            )  # fmt: skip
        )

    @staticmethod
    def kill_in(ns: str) -> list[int]:
        """SIGKILL every process in `ns` (`pids_in`). The pids still there after 5 s
        (none, normally)."""
        pids: list[int] = []
        for _ in range(50):
            pids = Testbed.pids_in(ns)
            if pids is None:
                if ns not in namespaces():
                    return []
                time.sleep(0.1)  # a listing that failed is not an empty namespace
                continue
            if not pids:
                return []
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        return pids or []

    @staticmethod
    def pids_in(ns: str) -> list[int] | None:
        """The processes whose network namespace is `ns` (`ip netns pids`), but this one
        (a driver that entered it) and the `ip` that lists them; None if the listing
        failed."""
        ls = subprocess.Popen(["ip", "netns", "pids", ns], stdout=subprocess.PIPE, text=True)
        out, _ = ls.communicate(timeout=10)
        if ls.returncode != 0:
            return None
        return [p for p in map(int, out.split()) if p not in (os.getpid(), ls.pid)]

    # ---- use -------------------------------------------------------------------

    def run(self, host: Host, argv: list[str], **popen) -> subprocess.Popen:
        """Start `argv` inside `host`'s namespace."""
        with self._lock:
            if self.closed:
                raise RuntimeError(f"testbed {self.name!r} is being removed")
            return subprocess.Popen(["ip", "netns", "exec", host.netns, *argv], **popen)

    def set_link(self, host: Host, up: bool) -> None:
        """Cut `host` off from every other host (its link down), or heal it."""
        _ip("-n", host.netns, "link", "set", "eth0", "up" if up else "down")

    def drop(self, host: Host, dst: Host, on: bool = True) -> None:
        """Silently drop what `host` sends to `dst`, or stop dropping it (one way: `dst`
        can still send to `host`). `host` addresses `dst`'s packets to NOWHERE."""
        if on:
            _ip("-n", host.netns, "neigh", "replace", dst.address, "lladdr", NOWHERE,
                "dev", "eth0", "nud", "permanent")  # fmt: skip
        else:  # the next packet resolves `dst` again
            _ip("-n", host.netns, "neigh", "del", dst.address, "dev", "eth0", check=False)


def leftovers() -> list[str]:
    """Namespaces any testbed left on the machine."""
    return sorted(n for n in namespaces() if n.startswith(PREFIX))


def _owner(name: str) -> int | None:
    """The live process, other than this one, that made testbed `name`, or None."""
    try:
        state = json.loads((STATE_DIR / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    pid = state.get("pid")
    if not isinstance(pid, int) or pid <= 1 or pid == os.getpid():
        return None
    st = proc_stat(pid)
    if st is None or st[1] != state.get("started"):
        return None  # gone, or its pid reused
    return pid


def remove(name: str | None = None, force: bool = False) -> tuple[int, list[str]]:
    """Remove testbed `name` (every testbed when None) as `Testbed.down` does, from what
    is on the machine alone: its namespaces, their processes, its state file and its Ray
    temp dir. A testbed whose maker still runs is left alone unless `force`. Returns how
    many namespaces were removed and the names of the testbeds left in use."""
    import shutil
    import tempfile

    with _removing:
        prefix = f"{PREFIX}{name}-" if name else PREFIX
        found = sorted(n for n in namespaces() if n.startswith(prefix))
        names = {name} if name else {n[len(PREFIX) :].split("-")[0] for n in found}
        names |= {f.stem for f in STATE_DIR.glob("*.json")} if name is None else set()
        busy = sorted(n for n in names if not force and _owner(n) is not None)
        removed = 0
        for ns in found:
            if ns[len(PREFIX) :].split("-")[0] in busy:
                continue
            left = Testbed.kill_in(ns)
            if left:
                raise RuntimeError(f"{ns}: processes {left} survived SIGKILL; not removed")
            _ip("netns", "del", ns, check=False)
            removed += 1
        for n in names - set(busy):
            (STATE_DIR / f"{n}.json").unlink(missing_ok=True)
            for d in Path(tempfile.gettempdir()).glob(f"{PREFIX}{n}-*ray"):
                shutil.rmtree(d, ignore_errors=True)
        return removed, busy
