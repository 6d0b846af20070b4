"""Celery tasks: ``ptq4arvg.run_job`` (a quantization job) and ``ptq4arvg.ping`` (a liveness probe)."""

from __future__ import annotations

import os
import socket
import sys

from celery.signals import worker_ready, worker_shutdown

from app.config import get_settings
from worker import runner
from worker.celery_app import TASK_PING, TASK_RUN_JOB, celery_app
from worker.reconciler import Reconciler
from worker.webhooks import WebhookSender


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
)
def run_job(self, job_id: str) -> str:
    """Run one job. Safe to deliver many times: only the delivery that claims the job runs it."""
    settings = get_settings()
    try:
        return runner.run_job(job_id, settings=settings, worker_name=self.request.hostname or "worker")
    except Exception as e:
        runner.fail_unclaimed(settings, job_id, e)  # a bug before the claim: do not leave it queued
        raise


_reconciler: Reconciler | None = None
_webhooks: WebhookSender | None = None


@worker_ready.connect
def _start_reconciler(sender=None, **_kwargs) -> None:
    """Beat, reap lost workers' jobs, re-send lost messages, sweep staging and expire artifacts, now and
    on a timer; and deliver webhook calls, beside whatever job runs."""
    global _reconciler, _webhooks
    _reconciler = Reconciler(get_settings(), celery_app, sender.hostname if sender else socket.gethostname())
    _reconciler.start()
    _webhooks = WebhookSender(get_settings())
    _webhooks.start()


@worker_shutdown.connect
def _stop_reconciler(**_kwargs) -> None:
    if _webhooks is not None:
        _webhooks.stop()
    if _reconciler is not None:
        _reconciler.stop()
