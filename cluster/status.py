"""`pdcluster status URL`: a short human summary of a running cluster, read from its
`/health`, `/debug/state` and `/metrics` (so an operator needs nothing else)."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def _metric_sums(text: str, name: str, by: str = "") -> dict[str, float]:
    """`name`'s samples summed by the value of their label `by` ('' when it has none),
    over every router replica's series."""
    out: dict[str, float] = {}
    for f in text_string_to_metric_families(text):
        for s in f.samples:
            if s.name == name:
                key = s.labels.get(by, "")
                out[key] = out.get(key, 0.0) + s.value
    return out


def render(url: str, timeout: float = 10) -> str:
    url = url.rstrip("/")
    with httpx.Client(timeout=timeout) as http:
        r = http.get(f"{url}/health")
        health = r.json()
        st = http.get(f"{url}/debug/state")
        state = st.json() if st.status_code == 200 else None
        metrics = http.get(f"{url}/metrics").text
    lines = [
        f"pdcluster at {url}: {health['status']} (prefill {health['prefill_healthy']} healthy, "
        f"decode {health['decode_healthy']} healthy"
        + (f"; lost: {', '.join(health['lost'])}" if health.get("lost") else "")
        + ")"
    ]
    inflight = _metric_sums(metrics, "pdcluster_requests_in_flight", "stage")
    restarts = _metric_sums(metrics, "pdcluster_worker_restarts_total", "role")
    if state is None:
        lines.append("  (router.debug_state is off: per-replica detail unavailable)")
    else:
        routers = state.get("routers") or [state]
        lines.append(
            f"routers: {len(routers)}, {state['requests_in_flight']} requests in flight "
            f"({', '.join(f'{k} {int(v)}' for k, v in sorted(inflight.items())) or 'none'})"
        )
        for r in routers:
            lines.append(
                f"  router {r.get('router_id', '')} pid {r['router_pid']} on node "
                f"{r['router_node_id'][:8]}: {r['router_requests_in_flight']} in flight"
            )
        for role in ("prefill", "decode"):
            for w in (w for w in state["workers"] if w["role"] == role):
                lines.append("  " + _worker_line(w))
        lines.append(
            f"leases {state['prefill_leases']} (pinned blocks {state['prefill_pinned_blocks']}), "
            f"transfers pending {state['transfer_pending']}, decode streams "
            f"{state['decode_streams']}, decode blocks used {state['decode_blocks_used']}"
        )
    xfer = _metric_sums(metrics, "pdcluster_kv_transfer_seconds_count")
    timeouts = _metric_sums(metrics, "pdcluster_kv_transfer_timeouts_total")
    expired = _metric_sums(metrics, "pdcluster_kv_leases_expired_total")
    lines.append(
        f"since the router started: restarts {_fmt(restarts)}, KV pulls "
        f"{int(sum(xfer.values()))} ({int(sum(timeouts.values()))} timed out), leases expired "
        f"{int(sum(expired.values()))}"
    )
    return "\n".join(lines)


def _fmt(by_role: dict[str, float]) -> str:
    return ", ".join(f"{k} {int(v)}" for k, v in sorted(by_role.items())) or "none"


def _worker_line(w: dict) -> str:
    name = f"{w['role']}-{w['replica']}"
    s = w["stats"]
    state = "healthy" if w["healthy"] else ("LOST" if w["lost"] else "UNHEALTHY")
    head = f"{name:10s} {state:9s}"
    if w["reason"] and not w["healthy"]:
        head += f" ({w['reason']})"
    if not s:
        return head + " no answer"
    e = s["engine"]
    total = e["used_blocks"] + e["free_blocks"]
    parts = [
        f"node {s.get('node_id', '')[:8]}",
        f"pid {s.get('pid', '?')}",
        f"running {e['running']}",
        f"waiting {e['waiting'] + e['waiting_for_blocks']}",
        f"KV {e['used_blocks']}/{total}",
    ]
    if w["role"] == "prefill":
        parts.append(f"leases {e['leases']}")
    else:
        parts += [f"streams {s['streams']}", f"pulls pending {s['transfers_pending']}"]
    parts.append(f"rss {s.get('rss_bytes', 0) / 2**20:.0f} MB")
    return head + " " + ", ".join(parts)
