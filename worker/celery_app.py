"""The Celery application. Configured from ``app.config.Settings``; imports no torch, no quantcore.

Reliability settings (see shared/reference/field-notes.md):
- ``task_acks_late`` + ``task_reject_on_worker_lost``: a task is acknowledged only when it ends, so a
  worker that dies (kill -9, OOM, lost node) leaves its job to be delivered again;
- ``worker_prefetch_multiplier = 1``: a GPU worker holds one job at a time;
- ``visibility_timeout`` above the longest job, so Redis does not hand a running job to a second
  worker; the job task is idempotent on the job id anyway (compare-and-set in the database).
"""

from __future__ import annotations

from celery import Celery

from app.config import Settings, get_settings

TASK_RUN_JOB = "ptq4arvg.run_job"
TASK_PING = "ptq4arvg.ping"


def make_celery(settings: Settings) -> Celery:
    celery = Celery("ptq4arvg", include=["worker.tasks"])
    transport_options: dict = {
        "visibility_timeout": settings.visibility_timeout,
        "socket_connect_timeout": settings.broker_timeout_seconds,  # an unreachable broker fails fast
    }
    if settings.broker_url.startswith("sqla+"):
        # kombu's SQLAlchemy transport hands its options to create_engine and never re-delivers
        # (a dead worker's job is re-enqueued by the recovery sweep at worker start instead).
        transport_options = {}
    celery.conf.update(
        broker_url=settings.broker_url,
        result_backend=settings.derived_result_backend(),
        task_default_queue=settings.queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=settings.broker_timeout_seconds,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=24 * 3600,
        task_track_started=True,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
    )
    return celery


celery_app = make_celery(get_settings())
app = celery_app  # `celery -A worker.celery_app` finds either name
