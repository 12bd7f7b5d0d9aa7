"""The chaos scenarios: one small entry each in `SCENARIOS`.

A scenario names a fault function and what it needs. The fault function applies
the fault to the running cluster (through `chaos.target.Target`) and returns the fault
window: when the fault began and when it ended (the same instant for a kill; the
SIGCONT for a stall). Adding a scenario is a new entry, or a new function of a few
lines when no existing one does the job. Nothing here imports Ray: the config
checker reads the names.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chaos.target import Target


@dataclass(frozen=True)
class Window:
    start: float  # time.time()
    end: float
    target: str = ""  # what was hit, for the report
    last: float | None = None  # several faults: the start of the last one
    lost: dict[str, int] = field(default_factory=dict)  # role -> replicas lost for good
    # Processes from before the fault that must be gone once the cluster has settled
    # (a node Ray declared dead: its old raylet tree, fenced off): [pid, start time].
    fenced: list = field(default_factory=list)
    # Ray nodes the fault must not cost their life (a partition shorter than Ray's bound).
    survivors: list[str] = field(default_factory=list)
    # A fault left in place while the load runs (a partition that does not heal): undone
    # once the load has ended, before the cluster must settle.
    undo: Callable[[], None] | None = None

    @property
    def recover_from(self) -> float:
        """Recovery is timed from here: the fault, or the last of several."""
        return self.start if self.last is None else self.last


@dataclass(frozen=True)
class Scenario:
    name: str
    about: str
    fault: Callable[[Target, Scenario, random.Random], Window]
    role: str | None = None  # the role whose health detection is timed
    params: dict = field(default_factory=dict)
    # Why this scenario does not apply to a config (None: it does).
    needs: Callable[[object], str | None] = lambda cfg: None
    network: bool = False  # a network fault: runs on a testbed only


def _replica(t: Target, role: str, rng: random.Random) -> int:
    """A replica of `role` that is not on the router's node (a node fault there
    would take the router down too: that is the kill-router scenario)."""
    choices = [i for i in range(t.replicas(role)) if t.info(role, i)["node_id"] != t.router_node()]
    if not choices:
        raise Skip(f"every {role} replica shares the router's node")
    return rng.choice(choices)


class Skip(Exception):
    """The scenario cannot run against this cluster; the message says why."""


class Missed(Exception):
    """The fault reached nothing (its process was already gone): not applied."""


def _hit(n: int, what: str) -> None:
    if n == 0:
        raise Missed(f"{what}: no such process any more")


# Fault times are this harness's clock, taken around the call to the node agent, so
# they compare with the request records even when the node's clock differs.


def kill_worker(t: Target, sc: Scenario, rng: random.Random) -> Window:
    i = rng.randrange(t.replicas(sc.role))
    info = t.info(sc.role, i, sc.params.get("rank", 0))
    agent = t.agent(info["node_id"])
    start = time.time()
    _hit(t.get(agent.kill.remote([info["pid"]])), f"{sc.role}-{i}")
    return Window(start, start, f"{sc.role}-{i} rank {info['rank']} (pid {info['pid']})")


def stall_worker(t: Target, sc: Scenario, rng: random.Random) -> Window:
    i = rng.randrange(t.replicas(sc.role))
    info = t.info(sc.role, i)
    agent = t.agent(info["node_id"])
    start = time.time()
    _hit(t.get(agent.stall.remote([info["pid"]], t.chaos.stall_s)), f"{sc.role}-{i}")
    return Window(start, time.time(), f"{sc.role}-{i} (pid {info['pid']})")


def kill_node(t: Target, sc: Scenario, rng: random.Random) -> Window:
    i = _replica(t, sc.role, rng)
    node = t.info(sc.role, i)["node_id"]
    start = t.kill_node(node)
    return Window(start, start, f"node {node[:8]} of {sc.role}-{i}")


def lose_nodes(t: Target, sc: Scenario, rng: random.Random) -> Window:
    """SIGKILL a node of each role in `roles`, one after another, and bring none back:
    there is no spare node to move to, so the survivors serve alone. The fault ends when
    Ray has marked the nodes dead (what follows is the cluster without them). The harness
    measures the head's CPU afterwards, then restores the nodes (local clusters and
    testbeds only: on a real one, the operator or KubeRay would replace a pod)."""
    if (t.rc is None or t.rc.local is None) and t.testbed is None:
        raise Skip("needs a local cluster or testbed started by the harness (it restores nodes)")
    picks = []
    for role in sc.params["roles"]:
        if t.replicas(role) < 2:
            raise Skip(f"one {role} replica: losing its node leaves none to serve")
        i = _replica(t, role, rng)
        picks.append((role, i, t.info(role, i)["node_id"]))
    if len({node for _, _, node in picks}) < len(picks):
        raise Skip("the picked replicas share a node")
    starts, lost = [], {}
    for role, i, node in picks:
        if starts:
            time.sleep(sc.params["gap_s"])
        starts.append(t.kill_node(node, replace=False))
        lost[role] = lost.get(role, 0) + 1
    end = t.wait_dead([node for _, _, node in picks], t.chaos.settle_s) or time.time()
    hit = "; ".join(f"node {node[:8]} of {role}-{i}" for role, i, node in picks)
    # Recovery counts from there: before it, Ray still took the nodes for alive.
    return Window(starts[0], end, f"{hit}, not replaced", last=end, lost=lost)


def stall_node(t: Target, sc: Scenario, rng: random.Random) -> Window:
    i = _replica(t, sc.role, rng)
    node = t.info(sc.role, i)["node_id"]
    agent = t.agent(node)
    start = time.time()
    _hit(t.get(agent.stall_node.remote(t.chaos.stall_s)), f"node {node[:8]}")
    return Window(start, time.time(), f"node {node[:8]} of {sc.role}-{i}")


def stall_mid_transfer(t: Target, sc: Scenario, rng: random.Random) -> Window:
    """Seed failure 5, decode waiting forever for KV: stop a prefill node while decode
    pulls from it. Pulls on the tiny model last milliseconds, so decode's pulls are
    first held open (a 1 s delay before each READ) until one is seen in flight."""
    from transfer.faults import FaultConfig

    i = _replica(t, sc.role, rng)
    node = t.info(sc.role, i)["node_id"]
    agent = t.agent(node)
    try:
        t.set_faults(FaultConfig(delay_rate=1.0, delay_s=1.0), roles=("decode",))
        deadline = time.monotonic() + 10
        while t.state()["transfer_pending"] == 0:
            if time.monotonic() > deadline:
                raise Missed("no KV pull was seen in flight within 10 s")
            time.sleep(0.05)
        start = time.time()
        stall = agent.stall_node.remote(t.chaos.stall_s)
    finally:
        t.set_faults(None, roles=("decode",))
    _hit(t.get(stall), f"node {node[:8]}")
    return Window(start, time.time(), f"node {node[:8]} of {sc.role}-{i}, with a pull in flight")


def kill_router(t: Target, sc: Scenario, rng: random.Random) -> Window:
    state = t.state()
    agent = t.agent(state["router_node_id"])
    start = time.time()
    _hit(t.get(agent.kill.remote([state["router_pid"]])), "router")
    return Window(start, start, f"router (pid {state['router_pid']})")


def transfer_faults(t: Target, sc: Scenario, rng: random.Random) -> Window:
    from transfer.faults import FaultConfig

    faults = FaultConfig(**sc.params, seed=rng.randrange(1 << 30))
    start = time.time()
    try:
        t.set_faults(faults)
        time.sleep(t.chaos.transfer_fault_s)
    finally:
        t.set_faults(None)
    rates = ", ".join(f"{k}={v}" for k, v in sc.params.items())
    return Window(start, time.time(), f"every worker: {rates}")


# ---- network faults (`pdcluster chaos --testbed`: chaos/testbed_ray.py) ------------


def _bed(t: Target):
    if t.testbed is None:
        raise Skip("a network fault: needs a testbed (`pdcluster chaos --testbed`)")
    return t.testbed


def isolate_node(t: Target, sc: Scenario, rng: random.Random) -> Window:
    """A node's link down for `partition_s` (less than Ray's `dead_after_s`), then up."""
    bed = _bed(t)
    i = _replica(t, sc.role, rng)
    host = t.host(sc.role, i)
    start = time.time()
    try:
        bed.isolate(host)
        time.sleep(bed.tc.partition_s)
    finally:
        bed.isolate(host, False)
    return Window(
        start,
        time.time(),
        f"node {host.node} ({sc.role}-{i}'s), link down",
        survivors=[t.info(sc.role, i)["node_id"]],
    )


def cut_links(t: Target, sc: Scenario, rng: random.Random) -> Window:
    """Drop the packets between one replica of `sc.params["cut"]`'s first role and every
    node of its second role ("head": the router's node, Ray's GCS), for `partition_s`;
    with `one_way`, only what the first sends. Every other path stays up. With
    `for_good`, the cut stays for the rest of the load (the cluster must recover without
    it healing) and is healed only once the load has ended."""
    bed = _bed(t)
    first, second = sc.params["cut"]
    i = _replica(t, first, rng)
    a = t.host(first, i)
    if second == "head":
        others = [bed.head]
    else:  # each host once, and not `a` itself (a node may carry both roles)
        others = list(dict.fromkeys(t.host(second, j) for j in range(t.replicas(second))))
        others = [b for b in others if b != a]
    if not others:
        raise Skip(f"every {second} replica shares {first}-{i}'s node")
    both = not sc.params.get("one_way", False)

    def heal():
        for b in others:
            bed.cut(a, b, on=False, both=both)

    start = time.time()
    try:
        for b in others:
            bed.cut(a, b, both=both)
        time.sleep(bed.tc.partition_s)
    except BaseException:
        heal()
        raise
    if not sc.params.get("for_good"):
        heal()
    arrow = "<->" if both else "->"
    names = ", ".join(b.node for b in others)
    return Window(
        start,
        time.time(),
        f"node {a.node} ({first}-{i}'s) {arrow} {names}: dropped"
        + (", not healed until the load ended" if sc.params.get("for_good") else ""),
        survivors=[t.info(first, i)["node_id"]],
        undo=heal if sc.params.get("for_good") else None,
    )


def cut_from_head(t: Target, sc: Scenario, rng: random.Random) -> Window:
    """A worker node cut from the head (Ray's GCS and the router) until Ray declares it
    dead, then healed; it still reaches the other workers. Its old raylet tree must be
    gone once the cluster settles (fenced): Ray's GCS refuses the old node when it
    returns, its raylet exits, and the node comes back as a new one."""
    bed = _bed(t)
    i = _replica(t, sc.role, rng)
    info = t.info(sc.role, i)
    host = t.host(sc.role, i)
    old = bed.started(t.get(t.agent(info["node_id"]).node_processes.remote()))
    t.drop_agent(info["node_id"])  # its node will be a new one
    start = time.time()
    try:
        bed.cut(host, bed.head)
        dead = t.wait_dead([info["node_id"]], bed.tc.dead_after_s + 30)
        if dead is None:
            raise RuntimeError(
                f"Ray did not declare {host.node} dead within {bed.tc.dead_after_s + 30}s"
            )
        time.sleep(max(0.0, start + bed.tc.dead_after_s + bed.tc.partition_s - time.time()))
    finally:
        bed.cut(host, bed.head, on=False)
    end = time.time()
    return Window(
        start,
        end,
        f"node {host.node} ({sc.role}-{i}'s) cut from the head; Ray declared it dead after "
        f"{dead - start:.1f}s",
        fenced=old,
    )


MIXED_POOL = (
    "kill-prefill-worker",
    "kill-decode-worker",
    "stall-prefill-worker",
    "stall-decode-worker",
    "transfer-delay",
    "transfer-fail",
    "lease-expiry",
)


def mixed(t: Target, sc: Scenario, rng: random.Random) -> Window:
    """Faults drawn from a seeded schedule, one after another with a gap between."""
    windows = []
    for k in range(sc.params.get("faults", 3)):
        if k:
            time.sleep(rng.uniform(1.0, 3.0))
        pick = SCENARIOS[rng.choice(MIXED_POOL)]
        t.forget()  # the last fault may have restarted the replica this one picks
        windows.append((pick.name, pick.fault(t, pick, rng)))
    return Window(
        windows[0][1].start,
        windows[-1][1].end,
        "; ".join(f"{name}: {w.target}" for name, w in windows),
        last=windows[-1][1].start,
    )


def _tp_only(cfg) -> str | None:
    if cfg.decode.tensor_parallel_size < 2:
        return "decode.tensor_parallel_size is 1: no rank to kill beside the leader"
    return None


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("kill-prefill-worker", "SIGKILL a prefill worker process", kill_worker, "prefill"),
        Scenario("kill-decode-worker", "SIGKILL a decode worker process", kill_worker, "decode"),
        Scenario(
            "kill-prefill-node",
            "SIGKILL a prefill node: its raylet and every process under it",
            kill_node,
            "prefill",
        ),
        Scenario("kill-decode-node", "SIGKILL a decode node", kill_node, "decode"),
        Scenario(
            "lose-node",
            "lose a decode node, then a prefill node, for good (no spare node)",
            lose_nodes,
            "decode",
            # The head (GCS, raylet, agents) idle afterwards, over head_window_s.
            {
                "roles": ("decode", "prefill"),
                "gap_s": 3.0,
                "head_window_s": 10.0,
                "max_head_cpu": 0.10,
            },
        ),
        Scenario(
            "stall-prefill-worker",
            "SIGSTOP a prefill worker, then SIGCONT",
            stall_worker,
            "prefill",
        ),
        Scenario(
            "stall-decode-worker", "SIGSTOP a decode worker, then SIGCONT", stall_worker, "decode"
        ),
        Scenario("stall-prefill-node", "SIGSTOP a whole prefill node", stall_node, "prefill"),
        Scenario("stall-decode-node", "SIGSTOP a whole decode node", stall_node, "decode"),
        Scenario(
            "stall-prefill-mid-transfer",
            "SIGSTOP a prefill node while decode pulls KV from it",
            stall_mid_transfer,
            "prefill",
        ),
        Scenario(
            "kill-tp-rank",
            "SIGKILL the last tensor-parallel rank of a decode group",
            kill_worker,
            "decode",
            {"rank": -1},
            needs=_tp_only,
        ),
        Scenario("kill-router", "SIGKILL the router replica", kill_router),
        Scenario(
            "transfer-delay",
            "every KV pull delayed by 0.5 s, half of them",
            transfer_faults,
            params={"delay_rate": 0.5, "delay_s": 0.5},
        ),
        Scenario(
            "transfer-stall",
            "5 % of KV pulls never complete (they end at transfer.timeout_s)",
            transfer_faults,
            params={"stall_rate": 0.05},
        ),
        Scenario(
            "transfer-fail", "5 % of KV pulls fail", transfer_faults, params={"fail_rate": 0.05}
        ),
        Scenario(
            "lease-expiry",
            "5 % of prefill leases expire before decode claims them",
            transfer_faults,
            params={"expire_rate": 0.05},
        ),
        Scenario("mixed", "three faults drawn from a seeded schedule", mixed, params={"faults": 3}),
        # Network faults: on a testbed only (each skips elsewhere, saying so).
        Scenario(
            "isolate-decode-node",
            "a decode node's link down for testbed.partition_s, then up",
            isolate_node,
            "decode",
            network=True,
        ),
        Scenario(
            "isolate-prefill-node",
            "a prefill node's link down for testbed.partition_s, then up",
            isolate_node,
            "prefill",
            network=True,
        ),
        Scenario(
            "cut-prefill-decode",
            "a prefill node and every decode node drop each other's packets; both still "
            "reach the head and the router",
            cut_links,
            params={"cut": ("prefill", "decode")},
            network=True,
        ),
        Scenario(
            "cut-prefill-decode-for-good",
            "a prefill node and every decode node drop each other's packets for the rest of "
            "the load: the cluster must recover while it lasts",
            cut_links,
            params={"cut": ("prefill", "decode"), "for_good": True},
            network=True,
        ),
        Scenario(
            "one-way-loss",
            "what a prefill node sends to the decode nodes is dropped; the other way works",
            cut_links,
            params={"cut": ("prefill", "decode"), "one_way": True},
            network=True,
        ),
        Scenario(
            "cut-router-decode",
            "a decode node and the router's node (the head) drop each other's packets while "
            "streams are open",
            cut_links,
            "decode",
            {"cut": ("decode", "head")},
            network=True,
        ),
        Scenario(
            "cut-decode-from-head",
            "a decode node cut from the head until Ray declares it dead, then healed: its "
            "old processes must be gone (fenced) and it rejoins as a new node",
            cut_from_head,
            "decode",
            network=True,
        ),
    )
}
