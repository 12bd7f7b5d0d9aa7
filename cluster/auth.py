"""API keys: `Authorization: Bearer <key>` on the router's routes (router.api_keys,
router.api_keys_file, or the file $PDCLUSTER_API_KEYS_FILE names)."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from cluster.config import RouterConfig

KEYS_FILE_ENV = "PDCLUSTER_API_KEYS_FILE"


def load_keys(cfg: RouterConfig) -> list[bytes]:
    """Every key this router accepts: the config's, and one per non-empty line of the
    keys file (lines starting with `#` are comments). A file that cannot be read is an
    error: a router that was told to ask for keys must not serve without them."""
    keys = list(cfg.api_keys)
    path = cfg.api_keys_file or os.environ.get(KEYS_FILE_ENV)
    if path:
        lines = Path(path).read_text().splitlines()
        from_file = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not from_file:
            raise ValueError(f"API keys file {path} holds no key")
        if any(len(k) < 8 for k in from_file):
            raise ValueError(f"API keys file {path}: every key must be at least 8 characters")
        keys += from_file
    return [k.encode() for k in keys]


class ApiKeys:
    def __init__(self, cfg: RouterConfig) -> None:
        self.keys = load_keys(cfg)
        self.guard_health_metrics = cfg.auth_health_metrics

    def required(self, path: str) -> bool:
        """Whether `path` needs a key: every route when keys are set, except `/health`
        and `/metrics` unless router.auth_health_metrics."""
        if not self.keys:
            return False
        return self.guard_health_metrics or path not in ("/health", "/metrics")

    def allows(self, authorization: str | None) -> bool:
        """A `Bearer <key>` header naming one of the keys, compared in constant time
        (every key is compared, whatever matched)."""
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        given_bytes = given.strip().encode()
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(given_bytes, key)
        return ok
