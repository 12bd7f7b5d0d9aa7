"""`pdcluster` command line: `up CONFIG`, `chaos CONFIG`, `bench URL`, `status URL`,
`fetch-model [SOURCE]`, `check-config CONFIG`, `testbed up|down`."""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time

import msgspec
import psutil

from chaos.config import cluster_config, load_chaos_config
from cluster.config import ConfigError

SHUTDOWN_S = 10.0  # the orderly stop's bound; the reaper does the rest
_stopping = False
_last_words: list = []  # run before a stop that ran out of time ends this process


def _request_stop(signum, frame) -> None:
    """SIGTERM or SIGINT: leave whatever runs, start-up included (start() then stops what
    it had started), and end this process within SHUTDOWN_S whatever happens. A stop
    already under way ignores further signals: a second Ctrl-C must not cut it short."""
    global _stopping
    if _stopping:
        return
    _stopping = True
    threading.Thread(target=_end_within, args=(SHUTDOWN_S,), daemon=True).start()
    raise KeyboardInterrupt


def _end_within(seconds: float) -> None:
    """End this process (status 0: the stop was asked for) after `seconds`, or as soon as
    one of the Ray daemons it started (GCS, raylets, log monitor) has ended: the orderly
    stop got that far, or the signal went to the whole process group, Ray's daemons are
    going down on their own and an orderly stop could only hang. The reaper
    (cluster/reaper.py) kills whatever is left."""
    deadline = time.monotonic() + seconds
    daemons = [p for p in psutil.Process().children() if not _reaper(p) and not _ip(p)]
    while time.monotonic() < deadline and all(_running(p) for p in daemons):
        time.sleep(0.1)
    _say_last_words()
    os._exit(0)


def _say_last_words() -> None:
    """What must run before a stop ends this process (a testbed's removal: idempotent)."""
    for fn in _last_words:
        try:
            fn()
        except Exception:  # noqa: BLE001 - ending anyway; say what was left
            logging.exception("while stopping")


def _reaper(p: psutil.Process) -> bool:
    try:
        return "cluster.reaper" in p.cmdline()
    except psutil.Error:  # ended already (a zombie has no command line)
        return False


def _ip(p: psutil.Process) -> bool:
    """A short-lived `ip` command of the testbed's, not a daemon."""
    try:
        return p.name() == "ip"
    except psutil.Error:
        return False


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _up(args: argparse.Namespace) -> int:
    # Before any import that touches Ray: a bad config starts nothing. A `chaos:` section
    # is checked too (one file serves `up` and `chaos`), then left out of what starts.
    cfg = cluster_config(load_chaos_config(args.config))
    return _serve(cfg)


def _stoppable() -> None:
    """SIGTERM and Ctrl-C stop this process (exit status 0, within SHUTDOWN_S)."""
    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)


def _serve(cfg, bed=None) -> int:
    """Start the cluster, serve until SIGTERM or Ctrl-C, stop it. With `bed` (a
    RayTestbed), on the testbed, which is removed at the end, whatever happens."""
    _stoppable()
    # Read when Ray is imported: without it the driver's core worker takes SIGTERM first,
    # prints a stack dump and aborts (status 134). Not passed on to the cluster's processes.
    # A real crash (SIGSEGV, SIGABRT) of this process still leaves its Python traceback.
    os.environ["RAY_DISABLE_FAILURE_SIGNAL_HANDLER"] = "1"
    faulthandler.enable()
    rc = None
    if bed is not None:
        _last_words.append(bed.down)
    try:
        from cluster.launcher import start

        os.environ.pop("RAY_DISABLE_FAILURE_SIGNAL_HANDLER")
        t0 = time.monotonic()
        if bed is not None:
            bed.up()
            cfg = bed.cluster_config()
        rc = start(cfg)
        print(
            f"pdcluster: serving {cfg.served_model_name} at {rc.url} "
            f"(started in {time.monotonic() - t0:.1f}s); Ctrl-C to stop",
            flush=True,
        )
        if bed is not None:
            hosts = ", ".join(f"{h.node} {h.address}" for h in bed.net.hosts)
            print(
                f"pdcluster: testbed {bed.tc.name}: {hosts}; clients run inside the head's "
                f"namespace: ip netns exec {bed.head.netns} ...",
                flush=True,
            )
        while True:
            time.sleep(1)
    except KeyboardInterrupt:  # the stop asked for; during start-up, start() has cleaned up
        print("pdcluster: stopped" if rc is None else "pdcluster: shutting down", flush=True)
        if rc is not None:
            rc.shutdown()
    finally:
        if bed is not None:
            bed.down()
    return 0


def _testbed(args: argparse.Namespace) -> int:
    if args.action == "down":
        from chaos.testbed import remove

        name = load_chaos_config(args.config).chaos.testbed.name if args.config else None
        removed, busy = remove(name, force=args.force)
        print(f"pdcluster: testbed removed ({removed} namespaces)")
        if busy:
            print(
                f"pdcluster: left {', '.join(busy)}: in use by a running pdcluster (--force "
                "removes it anyway)",
                file=sys.stderr,
            )
            return 1
        return 0
    if args.config is None:
        print("pdcluster: testbed up needs CONFIG", file=sys.stderr)
        return 2
    cfg = load_chaos_config(args.config)
    from chaos.testbed_ray import RayTestbed

    return _serve(cfg, RayTestbed(cfg))


def _chaos(args: argparse.Namespace) -> int:
    cfg = load_chaos_config(args.config)
    from chaos.scenarios import SCENARIOS

    if args.list:
        for s in SCENARIOS.values():
            print(f"{s.name:28s} {s.about}")
        return 0
    unknown = [n for n in args.scenario or [] if n not in SCENARIOS]
    if unknown:
        print(f"pdcluster: unknown scenario {', '.join(unknown)} (see --list)", file=sys.stderr)
        return 2
    if args.concurrency:
        cfg = msgspec.structs.replace(
            cfg, chaos=msgspec.structs.replace(cfg.chaos, concurrency=args.concurrency)
        )
    if (args.url is None) != (args.ray_address is None):
        print("pdcluster: --url and --ray-address go together (attach)", file=sys.stderr)
        return 2
    if args.testbed and args.url:
        print("pdcluster: --testbed starts its own cluster: no --url", file=sys.stderr)
        return 2
    _stoppable()
    try:
        from chaos.main import chaos_main

        return chaos_main(cfg, args, _last_words)
    except KeyboardInterrupt:  # the stop asked for: chaos_main removed its testbed, if any
        _say_last_words()  # in case the stop cut chaos_main's own removal short
        print("pdcluster chaos: stopped", flush=True)
        # At once: threads of the harness may still call Ray, whose shutdown at exit
        # would wait for a GCS that is gone. A local cluster's reaper stops its nodes.
        os._exit(0)


def _status(args: argparse.Namespace) -> int:
    import httpx

    from cluster.status import render

    try:
        print(render(args.url))
    except (httpx.HTTPError, ValueError, KeyError) as e:
        print(f"pdcluster: cannot read {args.url}: {e!r}", file=sys.stderr)
        return 1
    return 0


def _bench(args: argparse.Namespace) -> int:
    from bench.main import bench_main

    return bench_main(args)


def _fetch(args: argparse.Namespace) -> int:
    from workers.loader import resolve_model

    cfg = None if args.source else load_chaos_config(args.config)
    source = args.source or cfg.model.source
    cache = args.cache_dir or (cfg.model.cache_dir if cfg else None)
    t0 = time.monotonic()
    path = resolve_model(source, cache)
    if args.print_path:
        print(path)
    else:
        print(f"{source} -> {path} ({time.monotonic() - t0:.1f}s)")
    return 0


def _check(args: argparse.Namespace) -> int:
    load_chaos_config(args.config)
    print(f"{args.config}: ok")
    return 0


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    ap = argparse.ArgumentParser(prog="pdcluster", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start the cluster from a YAML config and serve HTTP")
    up.add_argument("config")
    up.set_defaults(fn=_up)
    ch = sub.add_parser(
        "chaos",
        help="run fault scenarios under load and write a report",
        description="Start the cluster from CONFIG (or attach to a running one), run steady "
        "streaming load, apply each scenario in turn, and write report.json, report.md and "
        "one PNG timeline per scenario. Exit status 0 only if every scenario met its "
        "thresholds (the config's `chaos:` section).",
    )
    ch.add_argument("config")
    ch.add_argument("--scenario", action="append", help="run only this one (repeatable)")
    ch.add_argument(
        "--duration", type=float, default=0.0, help="least seconds of load per scenario"
    )
    ch.add_argument("--concurrency", type=int, help="streaming clients (chaos.concurrency)")
    ch.add_argument("--seed", type=int, default=0)
    ch.add_argument("--out", default="chaos-report", help="report directory")
    ch.add_argument("--url", help="attach: the running cluster's HTTP address")
    ch.add_argument("--ray-address", help="attach: its Ray address (e.g. auto, ray://h:10001)")
    ch.add_argument("--soak", type=float, metavar="SECONDS", help="soak: long load, rare faults")
    ch.add_argument("--list", action="store_true", help="list the scenarios")
    ch.add_argument(
        "--testbed",
        action="store_true",
        help="run the cluster on a testbed of network namespaces (needs root), with the "
        "network scenarios",
    )
    ch.set_defaults(fn=_chaos)
    st = sub.add_parser(
        "status", help="a short summary of a running cluster (its /health, /debug/state)"
    )
    st.add_argument("url", nargs="?", default="http://127.0.0.1:8000")
    st.set_defaults(fn=_status)
    be = sub.add_parser(
        "bench",
        help="throughput, latency and goodput of an OpenAI-compatible endpoint",
        description="Streaming load against URL (pdcluster or any OpenAI-compatible server) "
        "at each --rates point (Poisson) or at --concurrency clients; writes bench.json, "
        "goodput.png and latency.png. --compare URL2 measures a second endpoint at every "
        "point, alternating which goes first, and gives the ratios.",
    )
    be.add_argument("url")
    be.add_argument("--compare", metavar="URL2", help="a second endpoint, measured alike")
    be.add_argument("--model", required=True, help="the model name sent in each request")
    be.add_argument("--rates", help="comma-separated request rates (req/s, Poisson arrivals)")
    be.add_argument(
        "--concurrency", type=int, default=32, help="clients (closed loop), or the in-flight cap"
    )
    be.add_argument("--duration", type=float, default=30.0, help="seconds of load per point")
    be.add_argument(
        "--requests", type=int, default=0, help="send exactly N requests per point instead"
    )
    be.add_argument("--prompt-tokens", default="64", help="N or LOW-HIGH (about one word each)")
    be.add_argument("--max-tokens", default="64", help="output tokens: N or LOW-HIGH")
    be.add_argument(
        "--system-prompt-tokens", type=int, default=0, help="a system prompt shared by all"
    )
    be.add_argument("--slo", help="targets for goodput, e.g. ttft=0.5,tpot=0.1 (seconds)")
    be.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    be.add_argument(
        "--extra",
        type=_json_object,
        default={},
        metavar="JSON",
        help="fields added to every request, e.g. '{\"logprobs\": 5}'",
    )
    be.add_argument(
        "--compare-extra",
        type=_json_object,
        metavar="JSON",
        help="measure URL a second time with these fields added instead of --extra's "
        "(side by side, like --compare): the cost of a request field",
    )
    be.add_argument("--seed", type=int, default=0)
    be.add_argument("--out", default="bench-report", help="report directory")
    be.add_argument("--fail-on-error", action="store_true", help="exit 1 if any request failed")
    be.set_defaults(fn=_bench)
    fm = sub.add_parser("fetch-model", help="fetch and convert a model source into the cache")
    fm.add_argument("source", nargs="?")
    fm.add_argument("--config", default="configs/local.yaml")
    fm.add_argument("--cache-dir", help="model cache (default: the config's model.cache_dir)")
    fm.add_argument("--print-path", action="store_true", help="print only the model's directory")
    fm.set_defaults(fn=_fetch)
    tb = sub.add_parser(
        "testbed",
        help="a cluster on a testbed of network namespaces, one per node (needs root)",
        description="`up CONFIG`: one network namespace per configured node and one for the "
        "head (router, Ray's GCS), on a bridge, with addresses from `chaos.testbed.subnet`; "
        "Ray and pdcluster started across them; removed on Ctrl-C. `down [CONFIG]`: remove "
        "what a testbed left (that config's, or every testbed's), after a crash too.",
    )
    tb.add_argument("action", choices=("up", "down"))
    tb.add_argument("config", nargs="?")
    tb.add_argument("--force", action="store_true", help="down: even a testbed still in use")
    tb.set_defaults(fn=_testbed)
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
