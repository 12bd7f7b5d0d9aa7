"""`pdcluster` command line: `up CONFIG`, `fetch-model [SOURCE]`, `check-config CONFIG`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

from cluster.config import ConfigError, load_config

SHUTDOWN_S = 10.0  # the orderly stop's bound; the reaper does the rest


def _up(args: argparse.Namespace) -> int:
    # Before any import that touches Ray: a bad config starts nothing.
    cfg = load_config(args.config)
    from cluster.launcher import start

    stop = threading.Event()
    # SIGTERM behaves like Ctrl-C: leave the serving loop and shut everything down.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    t0 = time.monotonic()
    rc = start(cfg)
    try:
        print(
            f"pdcluster: serving {cfg.served_model_name} at {rc.url} "
            f"(started in {time.monotonic() - t0:.1f}s); Ctrl-C to stop",
            flush=True,
        )
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        print("pdcluster: shutting down", flush=True)
        # Bounded: when the signal went to the whole process group, Ray's own daemons
        # are dying too and an orderly stop may hang; this process then just ends, and
        # the reaper (cluster/reaper.py) kills whatever is left.
        watchdog = threading.Timer(SHUTDOWN_S, lambda: os._exit(1))
        watchdog.daemon = True
        watchdog.start()
        rc.shutdown()
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from workers.loader import resolve_model

    source = args.source or load_config(args.config).model.source
    t0 = time.monotonic()
    path = resolve_model(source)
    print(f"{source} -> {path} ({time.monotonic() - t0:.1f}s)")
    return 0


def _check(args: argparse.Namespace) -> int:
    load_config(args.config)
    print(f"{args.config}: ok")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ap = argparse.ArgumentParser(prog="pdcluster", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start the cluster from a YAML config and serve HTTP")
    up.add_argument("config")
    up.set_defaults(fn=_up)
    fm = sub.add_parser("fetch-model", help="fetch and convert a model source into the cache")
    fm.add_argument("source", nargs="?")
    fm.add_argument("--config", default="configs/local.yaml")
    fm.set_defaults(fn=_fetch)
    cc = sub.add_parser("check-config", help="validate a config file")
    cc.add_argument("config")
    cc.set_defaults(fn=_check)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"pdcluster: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
