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
RETRY_S = 10.0  # start-up: between two tries at the dashboard and the router


@serve.deployment(
    num_replicas=1,  # keep 1: two replicas starting at once could submit two drivers
    max_ongoing_requests=1,
    ray_actor_options={"num_cpus": 0, "resources": {"pdcluster_head": 0.001}},
    health_check_period_s=10,
    health_check_timeout_s=60,
)
class PdclusterUp:
    def __init__(self):
        self.client: JobSubmissionClient | None = None
        self.job: str | None = None
        self.misses = 0
        # Model fetch and load, worker start-up and the router: until the router
        # answers, this app (and so the RayService) is not ready. Nothing here raises:
        # Serve gives up on a deployment whose constructor failed three times, and
        # KubeRay does not re-send an unchanged config. So whatever fails meanwhile (the
        # dashboard not up yet or not answering, a driver that ended: a bad config being
        # fixed, a node not there yet) is retried, for as long as it takes.
        while True:
            try:
                self._keep_driver()
            except Exception as e:  # noqa: BLE001 - see above: retried, never raised
                log.warning("pdcluster-up: %s; trying again in %.0f s", e, RETRY_S)
            else:
                if self._router_answers():  # with its driver known: check_health reads it
                    break
            time.sleep(RETRY_S)
        log.info("pdcluster-up: the router answers %s", HEALTH)

    def _keep_driver(self) -> None:
        """Adopt the running driver or submit one; submit again once it has ended."""
        if self.client is None:
            self.client = JobSubmissionClient(DASHBOARD)
        if self.job is None:
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
            return
        status = self.client.get_job_status(self.job)
        if status not in LIVE:
            job, self.job = self.job, None  # the next round submits a new one
            raise RuntimeError(f"pdcluster up (Ray job {job}) is {status}:\n{self._tail(job)}")

    def _tail(self, job: str) -> str:
        try:
            return self.client.get_job_logs(job)[-4000:]
        except Exception as e:  # noqa: BLE001 - the logs only explain; the job has ended
            return f"(its logs could not be read: {e!r})"

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
        """Serve's periodic check: fails once the driver has ended (Serve then replaces
        this replica, whose constructor submits a new one) or after MAX_MISSES checks in
        a row the dashboard did not answer."""
        try:
            status = self.client.get_job_status(self.job)
        except Exception:  # noqa: BLE001 - the dashboard did not answer this time
            self.misses += 1
            if self.misses >= MAX_MISSES:
                raise
            return
        self.misses = 0
        if status not in LIVE:
            raise RuntimeError(
                f"pdcluster up (Ray job {self.job}) is {status}:\n{self._tail(self.job)}"
            )


app = PdclusterUp.bind()
