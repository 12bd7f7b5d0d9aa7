"""The cluster under chaos: its HTTP endpoint, its workers and nodes through Ray (kill,
freeze, replace, inject transfer faults), its state, and a monitor of its health."""

from __future__ import annotations

import threading
import time

import httpx
import ray

from chaos.config import ChaosRunConfig
from chaos.scenarios import Skip

# Every /debug/state count that must be back at zero once load has ended.
ZERO_KEYS = (
    "requests_in_flight",
    "prefill_pending",
    "prefill_leases",
    "prefill_pinned_blocks",
    "prefill_blocks_used",
    "transfer_pending",
    "decode_waiting_for_blocks",
    "decode_streams",
    "decode_blocks_used",
)


class Target:
    """The cluster under test: its HTTP endpoint and, through Ray, its workers.

    `rc` is the launcher's RunningCluster when the harness started the cluster
    itself; a local one lets it replace a node it killed (on a real cluster that is
    the operator's or KubeRay's job)."""

    def __init__(self, cfg: ChaosRunConfig, url: str, rc=None, testbed=None):
        self.cfg, self.chaos, self.url, self.rc = cfg, cfg.chaos, url.rstrip("/"), rc
        self.testbed = testbed  # chaos/testbed_ray.py's RayTestbed: network faults
        self.http = httpx.Client(timeout=10)
        self._agents: dict[str, object] = {}
        self._info: dict[tuple[str, int, int], dict] = {}
        self._timers: list[threading.Thread] = []
        # Killed and not replaced (restore_lost brings them back): node ids; testbed hosts.
        self.lost_nodes: list = []

    def close(self) -> None:
        """Stop the node agents this harness started."""
        for a in self._agents.values():
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - its node may be gone
                pass
        self._agents.clear()
        self.http.close()

    # ---- reading -----------------------------------------------------------

    def replicas(self, role: str) -> int:
        return getattr(self.cfg, role).replicas

    def rank_handle(self, role: str, i: int, rank: int = 0):
        from cluster.launcher import NAMESPACE

        tp = getattr(self.cfg, role).tensor_parallel_size
        return ray.get_actor(f"pdcluster-{role}-{i}-rank{rank % tp}", namespace=NAMESPACE)

    def info(self, role: str, i: int, rank: int = 0) -> dict:
        """pid and node of a rank, as it answers now (cached for this scenario)."""
        key = (role, i, rank)
        if key not in self._info:
            self._info[key] = self.get(self.rank_handle(role, i, rank).ready.remote())
        return self._info[key]

    def forget(self) -> None:
        self._info.clear()

    def get(self, ref, timeout: float = 60):
        return ray.get(ref, timeout=timeout)

    def state(self) -> dict:
        r = self.http.get(f"{self.url}/debug/state")
        r.raise_for_status()
        return r.json()

    def health(self) -> dict | None:
        try:
            return self.http.get(f"{self.url}/health", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return None

    def router_node(self) -> str:
        return self.state()["router_node_id"]

    def host(self, role: str, i: int):
        """The testbed host that replica `i` of `role` runs on."""
        return self._host_of_node(self.info(role, i)["node_id"])

    def _host_of_node(self, node_id: str):
        address = next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)
        return self.testbed.host_at(address)

    def views_disagree(self) -> str:
        """'' when Ray's view of who is alive, the router's and the workers' own agree:
        Ray holds alive one node on each testbed host and no other, /health counts every
        replica healthy, and each replica's leader answers from a node Ray holds alive.
        Otherwise what differs."""
        nodes = [n for n in ray.nodes() if n["Alive"]]
        alive = {n["NodeID"] for n in nodes}
        held = sorted(n["NodeManagerAddress"] for n in nodes)
        want = sorted(h.address for h in self.testbed.net.hosts)
        if held != want:
            return f"Ray holds nodes alive at {held}, the testbed's hosts are {want}"
        h = self.health()
        if not h or any(h[f"{r}_healthy"] < self.replicas(r) for r in ("prefill", "decode")):
            return f"/health: {h}"
        for role in ("prefill", "decode"):
            for i in range(self.replicas(role)):
                try:
                    node = self.get(self.rank_handle(role, i).ready.remote(), 10)["node_id"]
                except Exception as e:  # noqa: BLE001 - restarting, or its node is gone
                    return f"{role}-{i}: {e!r}"
                if node not in alive:
                    return f"{role}-{i} answers from node {node[:8]}, which Ray holds dead"
        return ""

    # ---- acting ------------------------------------------------------------

    def agent(self, node_id: str):
        """The node agent on `node_id` (started on first use)."""
        from chaos.agent import start_agent

        a = self._agents.get(node_id)
        if a is None:
            a = self._agents[node_id] = start_agent(node_id)
            self.get(a.node_id.remote())
        return a

    def drop_agent(self, node_id: str) -> None:
        """Forget `node_id`'s agent (its node is going away)."""
        self._agents.pop(node_id, None)

    def kill_node(self, node_id: str, replace: bool = True) -> float:
        """SIGKILL a node; a local one comes back after node_down_s unless `replace` is
        False (then restore_lost brings it back). On a testbed a node's loop restarts it
        after node_down_s; not replaced, its host loses every process (its power off)."""
        if node_id == ray.get_runtime_context().get_node_id():
            raise Skip("refusing to kill the node this harness runs on")
        if self.testbed is not None and not replace:
            host = self._host_of_node(node_id)
            start = time.time()
            self.testbed.power(host, on=False)
            self._agents.pop(node_id, None)
            self.lost_nodes.append(host)
            return start
        agent = self.agent(node_id)
        start = time.time()
        agent.kill_node.remote()  # no answer: the agent dies with its node
        self._agents.pop(node_id)
        if not replace:
            self.lost_nodes.append(node_id)
        elif self.rc is not None and self.rc.local is not None:
            self._replace_later([node_id], self.chaos.node_down_s)
        return start

    def wait_dead(self, node_ids: list[str], timeout: float) -> float | None:
        """When Ray had marked every one of `node_ids` dead (its GCS takes seconds to
        notice a killed raylet); None if it had not after `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            if not alive & set(node_ids):
                return time.time()
            time.sleep(0.25)
        return None

    def restore_lost(self) -> None:
        """Bring back every node lost for good (local clusters, testbed hosts), now, one
        at a time (two local nodes starting at once can pick the same port)."""
        lost, self.lost_nodes = self.lost_nodes, []
        if self.testbed is not None:
            for host in dict.fromkeys(lost):
                self.testbed.power(host, on=True)
            return
        self._replace_later(lost, 0.0)

    def _replace_later(self, node_ids: list[str], after_s: float) -> None:
        t = threading.Thread(target=self._replace_nodes, args=(node_ids, after_s), daemon=True)
        t.start()
        self._timers.append(t)

    def _replace_nodes(self, node_ids: list[str], after_s: float) -> None:
        """Local nodes killed by chaos come back (same config) after `after_s`, the way
        KubeRay replaces a pod; their replicas are placed on them again."""
        from cluster.launcher import add_local_node

        time.sleep(after_s)
        local, rc = self.rc.local, self.rc
        for node_id in node_ids:
            dead = next((n for n in local.worker_nodes if n.node_id == node_id), None)
            if dead is not None:
                local.remove_node(dead, allow_graceful=False)
            add_local_node(rc, local, rc.local_nodes.pop(node_id))

    def surviving(self, lost: dict) -> float:
        """The share of the replicas left to the role that lost the most (1.0: none lost)."""
        return min([1.0] + [(self.replicas(r) - n) / self.replicas(r) for r, n in lost.items()])

    def head_cpu(self, seconds: float) -> tuple[float, dict[str, float]]:
        """Cores used over `seconds` by Ray's own processes on the router's node (the
        head: GCS, raylet, agents, monitors; not the router or other workers), in all
        and by process name."""
        agent = self.agent(self.router_node())
        before, t0 = self.get(agent.ray_cpu_s.remote()), time.monotonic()
        time.sleep(seconds)
        after, span = self.get(agent.ray_cpu_s.remote()), time.monotonic() - t0
        by: dict[str, float] = {}
        for pid, (name, cpu) in after.items():
            if pid in before:
                by[name] = by.get(name, 0.0) + (cpu - before[pid][1]) / span
        return sum(by.values()), {k: round(v, 3) for k, v in sorted(by.items())}

    def set_faults(self, faults, roles=("prefill", "decode")) -> None:
        """Transfer fault hooks on every replica of `roles` (None: off). A replica that
        is restarting is skipped: it comes back with the config's `transfer.faults`."""
        refs = []
        for role in roles:
            for i in range(self.replicas(role)):
                try:
                    refs.append(self.rank_handle(role, i).set_faults.remote(faults))
                except ValueError:  # no such actor right now (restarting)
                    pass
        for ref in refs:
            try:
                self.get(ref, timeout=30)
            except (ray.exceptions.RayError, TimeoutError):
                pass

    def wait_settled(self, timeout: float) -> tuple[bool, dict | None, str]:
        """Until /health is ok with every replica healthy and every count is zero."""
        for t in self._timers:
            t.join(timeout)
        self._timers.clear()
        deadline = time.monotonic() + timeout
        why, state = "", None
        while True:
            h = self.health()
            if h is None:
                why = "/health does not answer"
            elif (
                h.get("status") != "ok"
                or h["prefill_healthy"] < self.replicas("prefill")
                or h["decode_healthy"] < self.replicas("decode")
            ):
                why = f"/health: {h}"
            else:
                try:
                    state = self.state()
                    busy = {k: state[k] for k in ZERO_KEYS if state[k]}
                    why = f"/debug/state not zero: {busy}" if busy else ""
                except (httpx.HTTPError, ValueError) as e:
                    why = f"/debug/state: {e!r}"
            if not why:
                return True, state, ""
            if time.monotonic() > deadline:
                if state is None:
                    try:
                        state = self.state()
                    except (httpx.HTTPError, ValueError):
                        pass
                return False, state, why
            time.sleep(0.5)


class HealthMonitor:
    """/health sampled every 0.25 s for the whole run (time to detect)."""

    def __init__(self, target: Target):
        self.target, self.samples = target, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)

    def _run(self):
        while not self._stop.wait(0.25):
            self.samples.append((time.time(), self.target.health()))

    def between(self, start: float, end: float) -> list:
        return [
            [round(t, 2), h["prefill_healthy"], h["decode_healthy"]] if h else [round(t, 2), -1, -1]
            for t, h in list(self.samples)
            if start <= t <= end
        ]

    def all_healthy(self, h: dict | None, lost: dict | None = None) -> bool:
        """Every replica healthy; with replicas `lost` for good (role -> count), every
        survivor healthy and the lost ones seen as not."""
        t, lost = self.target, lost or {}

        def ok(role: str) -> bool:
            n = h[f"{role}_healthy"]
            return n == t.replicas(role) - lost[role] if role in lost else n >= t.replicas(role)

        return h is not None and h.get("status") == "ok" and ok("prefill") and ok("decode")

    def healthy_since(self, since: float, lost: dict | None = None) -> float | None:
        """The first sample at or after `since` with every replica (every survivor of
        `lost`) healthy."""
        for t, h in list(self.samples):
            if t >= since and self.all_healthy(h, lost):
                return t
        return None

    def detected(self, role: str | None, since: float) -> float | None:
        """First time at or after `since` a worker of `role` (any role when None) was
        reported unhealthy."""
        for t, h in list(self.samples):
            if t < since or h is None:
                continue
            roles = [role] if role else ["prefill", "decode"]
            if any(h[f"{r}_healthy"] < self.target.replicas(r) for r in roles):
                return t
        return None
