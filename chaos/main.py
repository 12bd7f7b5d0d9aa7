"""`pdcluster chaos`: start (or attach to) a cluster, run the scenarios or a soak,
write the report, stop what it started."""

from __future__ import annotations

import time

import ray

from chaos.config import ChaosRunConfig, cluster_config
from chaos.scenarios import SCENARIOS


def chaos_main(cfg: ChaosRunConfig, args, last_words: list | None = None) -> int:
    """`last_words`: where to put what must run even when a stop cuts this short (the
    testbed's removal)."""
    import logging

    from chaos.target import Target

    logging.getLogger("httpx").setLevel(logging.WARNING)
    rc = bed = None
    stopped = False
    if getattr(args, "testbed", False):
        from chaos.testbed_ray import RayTestbed
        from cluster.launcher import start

        bed = RayTestbed(cfg)
        if last_words is not None:
            last_words.append(bed.down)
        try:
            bed.up()  # this thread is then in the head's namespace
            rc = start(bed.cluster_config(), log_to_driver=False)
        except BaseException:
            bed.down()
            raise
        target = Target(cfg, rc.url, rc, testbed=bed)
    elif args.url:
        from cluster.launcher import NAMESPACE

        ray.init(address=args.ray_address, namespace=NAMESPACE, log_to_driver=False)
        target = Target(cfg, args.url)
    else:
        from cluster.launcher import start

        rc = start(cluster_config(cfg), log_to_driver=False)  # the progress lines stay readable
        target = Target(cfg, rc.url, rc)
    try:
        if target.http.get(f"{target.url}/debug/state").status_code == 404:
            print("pdcluster chaos: needs `router.debug_state: true` in the config")
            return 2
        t0 = time.monotonic()
        if args.soak:
            from chaos.soak import soak

            passed, rep = soak(target, args.soak, args.out, seed=args.seed)
        else:
            from chaos.harness import run

            names = args.scenario or list(SCENARIOS)
            passed, rep = run(target, names, args.out, seed=args.seed, min_duration=args.duration)
        print(
            f"pdcluster chaos: {'PASS' if passed else 'FAIL'} in {time.monotonic() - t0:.0f}s; "
            f"report in {args.out}/report.md"
        )
        return 0 if passed else 1
    except KeyboardInterrupt:
        # A stop: the harness's threads (the fault, the load) may still call Ray, and
        # one that does after ray.shutdown aborts this process before the testbed is
        # removed. So no orderly stop: the testbed's removal ends every process of its
        # cluster; the caller then ends this one at once, and a local cluster's reaper
        # (cluster/reaper.py) stops what is left of it.
        stopped = True
        raise
    finally:
        try:
            if not stopped:
                target.close()
                if rc is not None:
                    rc.shutdown()
                elif ray.is_initialized():
                    ray.shutdown()
        finally:
            if bed is not None:
                bed.down()
