"""Celery tasks: ``ptq4arvg.run_job`` (a quantization job) and ``ptq4arvg.ping`` (a liveness probe)."""

from __future__ import annotations

import logging
import os
import socket
import sys

from celery.signals import worker_ready

from app.config import get_settings
from worker import runner
from worker.celery_app import TASK_PING, TASK_RUN_JOB, celery_app

log = logging.getLogger(__name__)


@celery_app.task(name=TASK_PING)
def ping() -> dict:
    """Answers without touching the GPU: proves a worker consumes this queue."""
    return {
        "pong": True,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "torch_imported": "torch" in sys.modules,
    }


@celery_app.task(
    bind=True,
    name=TASK_RUN_JOB,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,
)
def run_job(self, job_id: str) -> str:
    """Run one job. Safe to deliver many times: only the delivery that claims the job runs it."""
    settings = get_settings()
    try:
        outcome = runner.run_job(job_id, settings=settings, worker_name=self.request.hostname or "worker")
    except Exception as e:
        runner.fail_unclaimed(settings, job_id, e)  # a bug before the claim: do not leave it queued
        raise
    if isinstance(outcome, runner.Busy):
        # Another live worker holds the job: look again later, so that if that worker dies the job
        # is taken over, and if it finishes this delivery ends as a no-op.
        raise self.retry(countdown=outcome.retry_in)
    return outcome


@worker_ready.connect
def _recover_jobs(sender=None, **_kwargs) -> None:
    """Re-enqueue jobs left `running` by a worker that died (the SQLAlchemy broker never re-delivers)."""
    try:
        for job_id, countdown in runner.jobs_to_recover(get_settings()):
            log.warning("re-enqueueing running job %s (countdown %.0fs)", job_id, countdown)
            run_job.apply_async((job_id,), countdown=countdown)
    except Exception:  # never keep a worker from starting
        log.exception("job recovery sweep failed")
