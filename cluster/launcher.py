"""Launcher: start (or join) a Ray cluster, place worker groups, deploy the router.

With `cluster.address: local` every configured node is a separate Ray node on
this machine (its own raylet and custom resources), started through
`ray.cluster_utils.Cluster`; tests and `make serve` both take this path. With
any other address the launcher joins that cluster and uses its nodes.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import (
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import (
    HEAD_RESOURCE,
    Config,
    NodeConfig,
    worker_spec,  # the one place a WorkerSpec is built
)
from cluster.edge import proxy_env
from cluster.peers import RouterPeers
from workers.decode_worker import DecodeWorker
from workers.loader import resolve_model
from workers.prefill_worker import PrefillWorker
from workers.rank_worker import RankWorker

log = logging.getLogger("pdcluster.launcher")

# Named actors (`pdcluster-<role>-<replica>-rank<r>`) live here, so that a second
# driver (`pdcluster chaos --attach`, an operator's script) finds them by name.
NAMESPACE = "pdcluster"

# Small object stores: KV moves over NIXL, not through Ray's object store.
_OBJECT_STORE_BYTES = 256 * 1024**2
_READY_TIMEOUT_S = 300
_MODEL_TIMEOUT_S = 3600  # workers that resolve the model on their own node (download + convert)


@dataclass
class WorkerGroup:
    """One replica: `tensor_parallel_size` rank actors in a STRICT_PACK placement group."""

    role: str
    replica: int
    ranks: list[ray.actor.ActorHandle]
    pg: object
    share: float  # of its role's node resource (Placement.share)

    @property
    def leader(self) -> ray.actor.ActorHandle:
        return self.ranks[0]


@dataclass
class RunningCluster:
    config: Config
    model_dir: str  # "" when each node resolved its own copy
    prefill: list[WorkerGroup] = field(default_factory=list)
    decode: list[WorkerGroup] = field(default_factory=list)
    local: object | None = None  # ray.cluster_utils.Cluster when address is local
    # Local only: the config of each worker node, by Ray node id (chaos replaces a
    # node it killed with one of the same config).
    local_nodes: dict[str, NodeConfig] = field(default_factory=dict)
    reaper: subprocess.Popen | None = None  # cluster/reaper.py, when address is local
    url: str = ""
    # Serve was already running (a RayService's, or another app's): stopping pdcluster
    # deletes its own application only and leaves Serve up.
    serve_was_running: bool = False
    peers: object | None = None  # cluster/peers.py: what the router replicas share
    keeper: Keeper | None = None  # replaces groups whose node is gone (see Keeper)

    def shutdown(self) -> None:
        """Stop Serve, the workers and (when local) every Ray node we started."""
        from ray import serve

        if self.keeper is not None:  # no group replaced while they are being stopped
            self.keeper.stop()
        try:
            if ray.is_initialized():
                # Workers first: the router's open streams then end at once, and Serve
                # stops its replicas without waiting out their graceful period (its
                # proxy gone meanwhile, each stream would end in a logged traceback).
                for g in self.prefill + self.decode:
                    for a in g.ranks:
                        ray.kill(a, no_restart=True)
                    remove_placement_group(g.pg)
                if self.serve_was_running:
                    serve.delete("pdcluster")
                else:
                    serve.shutdown()
                if self.peers is not None:
                    ray.kill(self.peers, no_restart=True)
        except Exception:  # noqa: BLE001 - shutting down; report and go on
            log.exception("error while stopping workers")
        finally:
            if ray.is_initialized():
                ray.shutdown()
            if self.local is not None:
                self.local.shutdown()
                self.local = None
            if self.reaper is not None:  # kills what the orderly stop left (agents)
                self.reaper.stdin.close()
                self.reaper.wait(timeout=30)
                self.reaper = None


# A local cluster listens on the loopback interface only (Ray's GCS, raylets, object
# managers, agents and workers; UCX; gloo): nothing on the LAN can submit work to it.
LOCAL_IP = "127.0.0.1"
_LOCAL_ENV = {
    "UCX_NET_DEVICES": "lo",  # NIXL's UCX: its TCP transport listens per device used
    "GLOO_SOCKET_IFNAME": "lo",  # tensor-parallel collectives
}


def _connect(**init_args) -> None:
    """ray.init, keeping this process's SIGTERM handler: Ray puts in one of its own
    (sys.exit(15)), which would make a supervisor's stop an error exit that skips
    `pdcluster up`'s bounded stop. A SIGTERM that Ray's handler took during ray.init
    (which can wait minutes for an unreachable GCS) goes to ours."""
    if threading.current_thread() is not threading.main_thread():
        ray.init(**init_args)
        return
    ours = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(**init_args)
    except SystemExit as e:
        if e.code != signal.SIGTERM or not callable(ours):
            raise
        signal.signal(signal.SIGTERM, ours)
        ours(signal.SIGTERM, None)
        raise
    finally:
        if ours is not None:
            signal.signal(signal.SIGTERM, ours)


def _start_ray(cfg: Config, rc: RunningCluster, log_to_driver: bool):
    if cfg.cluster.address != "local":
        _connect(address=cfg.cluster.address, namespace=NAMESPACE, log_to_driver=log_to_driver)
        return None
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    # Ray binds each server to 127.0.0.1 only when that is its node's address, and
    # ray.init would otherwise turn a loopback address into the machine's own IP.
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ.update(_LOCAL_ENV)  # inherited by raylets and so by every worker
    rc.reaper = subprocess.Popen(
        [sys.executable, "-m", "cluster.reaper", str(os.getpid())],
        stdin=subprocess.PIPE,
        start_new_session=True,  # the signal that stops this process does not reach it
    )
    # Head runs the Serve controller, proxy and router; workers go to named nodes.
    # shutdown_at_exit=False: where the kernel cannot tie Ray's processes to this one,
    # Ray would start its own reaper and make this process a process group leader
    # (setpgrp), out of its terminal's foreground group, so that Ctrl-C on `make serve`
    # would not reach it. cluster/reaper.py does that job instead.
    local = Cluster(
        initialize_head=True,
        shutdown_at_exit=False,
        head_node_args={
            "num_cpus": 1,
            "resources": {HEAD_RESOURCE: 1},
            "object_store_memory": _OBJECT_STORE_BYTES,
            "include_dashboard": False,
            "node_ip_address": LOCAL_IP,
        },
    )
    rc.local = local  # a stop while the nodes below start must find what is already up
    for node in cfg.cluster.nodes:
        add_local_node(rc, local, node)
    _connect(address=local.address, namespace=NAMESPACE, log_to_driver=log_to_driver)
    return local


def add_local_node(rc: RunningCluster, local, node: NodeConfig) -> str:
    """Start one worker node of a local cluster (its own raylet); its Ray node id."""
    n = local.add_node(
        num_cpus=node.num_cpus,
        resources=dict(node.resources),
        object_store_memory=_OBJECT_STORE_BYTES,
        node_ip_address=LOCAL_IP,
    )
    rc.local_nodes[n.node_id] = node
    return n.node_id


@dataclass(frozen=True)
class Placement:
    """Where the replicas of one role go. `share` is the amount of the role's node
    resource each replica takes: 1.0 (one unit, so a node with `decode_node: 1` holds
    one replica and a replica whose node dies waits for another node with a free unit
    rather than doubling up on a survivor), or a small share when there are fewer
    units than replicas. `targets` spreads replicas over distinct nodes first."""

    share: float
    targets: list[str]


def plan_placement(
    role: str, resource: str, replicas: int, nodes: list[dict], demand: int | None = None
) -> Placement:
    """Anti-affinity for the replicas of one role, from `ray.nodes()`. `demand` is how
    many replicas of every role use `resource` (two roles may share one)."""
    have = sorted(
        (n["NodeID"] for n in nodes if n["Alive"] and n["Resources"].get(resource, 0) > 0),
    )
    units = sum(int(n["Resources"][resource]) for n in nodes if n["Alive"] and n["NodeID"] in have)
    if len(have) < replicas:
        log.warning(
            "%d %s replicas on %d node(s) with `%s`: replicas share a node, and one node's "
            "failure takes all of them on it down",
            replicas,
            role,
            len(have),
            resource,
        )
    share = 1.0 if units >= (demand or replicas) else 0.001
    return Placement(share, [have[i % len(have)] for i in range(replicas)] if have else [])


def _start_group(
    cfg: Config, role: str, replica: int, model_dir: str, place: Placement
) -> WorkerGroup:
    g = cfg.prefill if role == "prefill" else cfg.decode
    res = {g.node_resource: place.share / g.tensor_parallel_size}
    pg = placement_group(
        [dict(res) for _ in range(g.tensor_parallel_size)],
        strategy="STRICT_PACK",
        name=f"pdcluster-{role}-{replica}",
        # A hint: the bundles go elsewhere if this node is full or gone.
        _soft_target_node_id=place.targets[replica] if place.targets else None,
    )
    ranks = []
    for r in range(g.tensor_parallel_size):
        spec = worker_spec(cfg, role, replica, model_dir, r)
        # Rank 0 runs the engine; ranks 1.. follow its step plans (workers/tp.py).
        cls = (PrefillWorker if role == "prefill" else DecodeWorker) if r == 0 else RankWorker
        extra = {} if r == 0 else {"max_concurrency": 8}  # concurrent shard pulls
        ranks.append(
            cls.options(
                # A dead worker comes back (same handle, new process, new NIXL agent);
                # the router's watchdog kills stalled ones so that this applies to them
                # too, and a TP group restarts as a unit (workers/tp.py).
                max_restarts=-1,
                max_task_retries=0,
                num_cpus=0,
                resources=res,
                name=spec.rank_name(r),
                **extra,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=r
                ),
            ).remote(spec)
        )
    return WorkerGroup(role, replica, ranks, pg, place.share)


KEEP_S = 0.1  # between the keeper's looks (one GCS call each): bounds the GCS's busy loop


class Keeper:
    """Takes back the demand of a worker group whose node is gone while no node has room.

    Ray's GCS retries a placement group whose node died (RESCHEDULING) with no backoff
    until it fits somewhere: with no spare node, forever, a core of the head's GCS, and
    another of its metrics agent replaying each attempt's latency sample. A group seen
    RESCHEDULING is removed (its actors die with it) and started afresh under the same
    names: a new group is PENDING, which the GCS retries at most once a second, and is
    placed, its workers started, when a node with room joins (where there was room all
    along, at once). The router finds them by name (cluster/pool.py)."""

    def __init__(self, rc: RunningCluster):
        self.rc, self._stopping = rc, threading.Event()
        self._busy = threading.Lock()  # a replacement ends before a stop goes on
        threading.Thread(target=self._run, name="pdcluster-keeper", daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
        if self._busy.acquire(timeout=5):  # bounded: a stop must not hang on the GCS
            self._busy.release()

    def _run(self) -> None:
        while not self._stopping.wait(KEEP_S):
            try:
                state = {k: v["state"] for k, v in placement_group_table().items()}
            except Exception:  # noqa: BLE001 - the GCS busy or restarting: next look
                log.warning("keeper: cannot read the placement groups", exc_info=True)
                continue
            for groups in (self.rc.prefill, self.rc.decode):
                for i, g in enumerate(groups):
                    # REMOVED: taken back, but starting it again failed: tried again.
                    if state.get(g.pg.id.hex()) not in ("RESCHEDULING", "REMOVED"):
                        continue
                    with self._busy:
                        if self._stopping.is_set():
                            return
                        try:
                            groups[i] = self._replace(g)
                        except Exception:  # noqa: BLE001 - tried again at the next look
                            log.exception("keeper: could not replace %s-%d", g.role, g.replica)

    def _replace(self, g: WorkerGroup) -> WorkerGroup:
        log.warning(
            "%s-%d: its node is gone; it starts again where there is room, or when a node "
            "with room joins",
            g.role,
            g.replica,
        )
        remove_placement_group(g.pg)  # first: the GCS stops retrying it at once
        for a in g.ranks:
            ray.kill(a, no_restart=True)
        cfg = self.rc.config
        names = [
            worker_spec(cfg, g.role, g.replica, "", r).rank_name(r) for r in range(len(g.ranks))
        ]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(map(_named, names)):
            time.sleep(0.1)  # until the dead actors' names are free again
        return _start_group(cfg, g.role, g.replica, self.rc.model_dir, Placement(g.share, []))


def _named(name: str) -> bool:
    try:
        ray.get_actor(name, namespace=NAMESPACE)
        return True
    except ValueError:
        return False


def _serve_running() -> bool:
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


def start(cfg: Config, log_to_driver: bool = True) -> RunningCluster:
    """Bring the whole system up; returns once HTTP is being served. Without
    `log_to_driver`, the workers' and router's logs stay in Ray's log files."""
    from ray import serve

    from cluster.router import build_app

    t0 = time.monotonic()
    # The cluster's own sections only: a config that carries more (chaos's) would reach
    # the router, whose decode of `Config` refuses unknown sections.
    cfg = Config(**{f: getattr(cfg, f) for f in Config.__struct_fields__})
    # A local cluster shares this machine's files: the model is resolved once, here.
    # On any other cluster each worker and the router resolve it on their own node
    # (model_dir ""), into that node's cache or `model.cache_dir`.
    model_dir = ""
    if cfg.cluster.address == "local":
        model_dir = str(resolve_model(cfg.model.source, cfg.model.cache_dir))
        log.info("model ready at %s (%.1fs)", model_dir, time.monotonic() - t0)
    rc = RunningCluster(cfg, model_dir)
    try:
        rc.local = _start_ray(cfg, rc, log_to_driver)
        # Before anything can fail: a stop must not shut down a Serve that others run.
        rc.serve_was_running = _serve_running()
        log.info("ray up (%.1fs)", time.monotonic() - t0)
        nodes = ray.nodes()
        for role in ("prefill", "decode"):
            g = getattr(cfg, role)
            demand = sum(
                x.replicas for x in (cfg.prefill, cfg.decode) if x.node_resource == g.node_resource
            )
            place = plan_placement(role, g.node_resource, g.replicas, nodes, demand)
            groups = [_start_group(cfg, role, i, model_dir, place) for i in range(g.replicas)]
            setattr(rc, role, groups)
        ready = [a.ready.remote() for g in rc.prefill + rc.decode for a in g.ranks]
        # Off a local cluster, each worker first fetches and converts the model on its node.
        wait_s = _READY_TIMEOUT_S if cfg.cluster.address == "local" else _MODEL_TIMEOUT_S
        for info in ray.get(ready, timeout=wait_s):
            log.info("worker ready: %s", info)
        rc.keeper = Keeper(rc)
        serve.start(
            http_options={"host": cfg.router.host, "port": cfg.router.port},
            proxy_location="HeadOnly",
            # The proxy inherits the controller's environment: it installs cluster/edge.py.
            controller_options={"runtime_env": {"env_vars": proxy_env(cfg.router)}},
        )
        on_head = HEAD_RESOURCE in ray.cluster_resources()
        rc.peers = RouterPeers.options(resources={HEAD_RESOURCE: 0.001} if on_head else {}).remote(
            cfg.router.watchdog_s, cfg.router.health_period_s
        )
        serve.run(
            build_app(
                cfg,
                model_dir,
                [g.leader for g in rc.prefill],
                [g.leader for g in rc.decode],
                rc.peers,
                pin_to_head=on_head,
            ),
            name="pdcluster",
            route_prefix="/",
        )
        rc.url = f"http://{cfg.router.host}:{cfg.router.port}"
        log.info("serving %s at %s (%.1fs)", cfg.served_model_name, rc.url, time.monotonic() - t0)
        return rc
    except BaseException:
        rc.shutdown()
        raise
