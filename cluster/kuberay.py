"""Runs `pdcluster up` under KubeRay's RayService: the serveConfigV2 app "pdcluster-up"
(`import_path: cluster.kuberay:app`, deploy/kuberay/rayservice.yaml).

`pdcluster up` is a Ray driver that owns the worker actors and deploys the router
(Serve app "pdcluster") itself, so no import path can build it. This one-replica app
submits it as a Ray job on the head, or adopts the one already running; its
constructor returns once the router answers /health, and its health check fails when
the job has ended, so that Serve replaces the replica and a new job is submitted.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request

from ray import serve
from ray.job_submission import JobStatus, JobSubmissionClient

log = logging.getLogger("ray.serve")

CONFIG = os.environ.get("PDCLUSTER_CONFIG", "/etc/pdcluster/cluster.yaml")
DASHBOARD = "http://127.0.0.1:8265"  # this replica runs on the head (pdcluster_head)
HEALTH = "http://127.0.0.1:8000/health"  # the router, through the head's Serve proxy
TAG = {"pdcluster": "up"}  # job metadata that marks the driver
LIVE = (JobStatus.PENDING, JobStatus.RUNNING)
MAX_MISSES = 6  # health checks in a row the dashboard may fail to answer


@serve.deployment(
    num_replicas=1,  # keep 1: two replicas starting at once could submit two drivers
    max_ongoing_requests=1,
    ray_actor_options={"num_cpus": 0, "resources": {"pdcluster_head": 0.001}},
    health_check_period_s=10,
    health_check_timeout_s=60,
)
class PdclusterUp:
    def __init__(self, start_timeout_s: float = 1800.0):
        self.client = JobSubmissionClient(DASHBOARD)
        self.misses = 0
        live = [
            j.submission_id
            for j in self.client.list_jobs()
            if (j.metadata or {}).get("pdcluster") == "up" and j.status in LIVE
        ]
        if live:
            self.job = live[0]
            log.info("pdcluster-up: adopting the running driver, job %s", self.job)
        else:
            self._submit()
        # Model fetch and load, worker start-up and the router: until the router
        # answers, this app (and so the RayService) is not ready. A driver that ends
        # meanwhile (a bad config being fixed, a node not there yet) is submitted again
        # here, not by failing the constructor: Serve gives up on a deployment whose
        # constructor failed three times, and KubeRay does not re-send an unchanged config.
        deadline = time.monotonic() + start_timeout_s
        while not self._router_answers():
            try:
                self.check_health()
            except RuntimeError as e:
                log.warning("pdcluster-up: %s; submitting again in 10 s", e)
                time.sleep(10)
                self._submit()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"pdcluster up (job {self.job}) not serving after {start_timeout_s:.0f}s"
                )
            time.sleep(5)
        log.info("pdcluster-up: the router answers %s", HEALTH)

    def _submit(self) -> None:
        self.job = self.client.submit_job(
            entrypoint=f"/opt/venv/bin/pdcluster up {CONFIG}", metadata=dict(TAG)
        )
        log.info("pdcluster-up: submitted `pdcluster up %s` as job %s", CONFIG, self.job)

    @staticmethod
    def _router_answers() -> bool:
        try:
            with urllib.request.urlopen(HEALTH, timeout=5) as r:
                return r.status == 200  # "ok" or "degraded"
        except (urllib.error.URLError, OSError):
            return False  # no route yet (404), no healthy decode (503), no proxy yet

    def check_health(self) -> None:
        try:
            status = self.client.get_job_status(self.job)
        except Exception:  # noqa: BLE001 - the dashboard did not answer this time
            self.misses += 1
            if self.misses >= MAX_MISSES:
                raise
            return
        self.misses = 0
        if status not in LIVE:
            tail = self.client.get_job_logs(self.job)[-4000:]
            raise RuntimeError(f"pdcluster up (Ray job {self.job}) is {status}:\n{tail}")


app = PdclusterUp.bind()
