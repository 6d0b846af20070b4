"""What every live worker does on a timer (``reconcile_seconds``), beside the job it runs:

1. beat: its row in ``workers`` (readiness counts live workers);
2. reap: a running job whose lease expired (its worker died or hangs) goes back to ``queued`` and
   gets a new message, or ends ``canceled`` if a cancel was asked for;
3. re-send: a job queued for longer than one period whose task id the broker does not hold (a Redis
   restart without persistence, a submission while the broker was down) gets a new message;
4. sweep: staging folders of attempts that no longer run are removed (or, for a committed artifact,
   moved into place), and deletions a kill interrupted are finished;
5. expire: with ``artifact_retention_days`` set, artifacts older than that are deleted (never one of
   a job that has not ended).

Every step is a compare-and-set in the database, so the sweeps of many workers never double a job;
a duplicate message is harmless anyway (the task is idempotent on the job id). A step that fails
(database or broker down) is logged and tried again on the next tick.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import uuid
from collections.abc import Iterable

import redis
from celery import Celery
from sqlalchemy import create_engine, inspect, text

from app.config import Settings
from app.db import jobs, recovery
from app.db.session import session_scope
from worker import disk
from worker.celery_app import TASK_RUN_JOB

log = logging.getLogger(__name__)

FORGET_WORKERS_AFTER_S = 24 * 3600
REDIS_UNACKED_KEY = "unacked"  # kombu's Redis transport: delivered, not yet acknowledged messages


def _task_ids(messages: Iterable[bytes | str]) -> set[str]:
    ids = set()
    for raw in messages:
        try:
            message = json.loads(raw)
        except ValueError:
            continue
        if isinstance(message, list) and message:  # unacked entries are [message, exchange, key]
            message = message[0]
        task_id = (message.get("headers") or {}).get("id") if isinstance(message, dict) else None
        if task_id:
            ids.add(task_id)
    return ids


@functools.lru_cache(maxsize=4)
def _broker_engine(url: str):
    return create_engine(url)


def broker_task_ids(settings: Settings) -> set[str] | None:
    """Ids of the tasks the broker holds for our queue (waiting or delivered and not acknowledged);
    None for a broker this cannot read. Raises when the broker is unreachable."""
    url = settings.broker_url
    if url.startswith(("redis://", "rediss://")):
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            return _task_ids(client.lrange(settings.queue, 0, -1)) | _task_ids(
                client.hvals(REDIS_UNACKED_KEY)
            )
        finally:
            client.close()
    if url.startswith("sqla+"):
        engine = _broker_engine(url.removeprefix("sqla+"))
        if not inspect(engine).has_table("kombu_message"):
            return set()  # nothing was ever sent
        query = text(
            "SELECT m.payload FROM kombu_message m JOIN kombu_queue q ON m.queue_id = q.id "
            "WHERE q.name = :queue AND m.visible"
        )
        with engine.connect() as connection:
            return _task_ids(row[0] for row in connection.execute(query, {"queue": settings.queue}))
    return None


class Reconciler:
    def __init__(self, settings: Settings, celery: Celery, worker_name: str):
        self.settings = settings
        self.celery = celery
        self.name = worker_name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        try:
            with session_scope(self.settings.database_url) as session:
                recovery.forget_worker(session, self.name)
        except Exception:
            log.warning("could not remove worker %s from the workers table", self.name, exc_info=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(self.settings.reconcile_seconds)

    def tick(self) -> None:
        for step in (self.beat, self.reap, self.resend, self.sweep, self.expire):
            try:
                step()
            except Exception as e:  # the database or broker is down: the next tick tries again
                log.warning("%s failed: %s: %s", step.__name__, type(e).__name__, e)

    def beat(self) -> None:
        with session_scope(self.settings.database_url) as session:
            recovery.beat(session, name=self.name, pid=os.getpid(), queue=self.settings.queue)
            recovery.prune_workers(session, older_than_seconds=FORGET_WORKERS_AFTER_S)

    def reap(self) -> list[str]:
        """Requeue (or end, if canceled) the running jobs whose lease expired; their ids."""
        requeued, reaped = [], []
        with session_scope(self.settings.database_url) as session:
            for job in jobs.stale_running_jobs(session, lease_seconds=self.settings.job_lease_seconds):
                if job.cancel_requested:
                    if recovery.cancel_orphaned(session, job, actor=self.name):
                        reaped.append(job.id)
                elif recovery.requeue_expired(session, job, actor=self.name):
                    log.warning("job %s: lease of %s expired; queued again", job.id, job.worker)
                    requeued.append((job.id, job.task_id))
        for job_id, task_id in requeued:
            self._send(job_id, task_id)
        return reaped + [job_id for job_id, _ in requeued]

    def resend(self) -> list[str]:
        """Send a new message for every queued job the broker has lost; their ids."""
        with session_scope(self.settings.database_url) as session:
            waiting = [
                (j.id, j.task_id)
                for j in recovery.queued_since(session, seconds=self.settings.reconcile_seconds)
            ]
        if not waiting:
            return []
        held = broker_task_ids(self.settings)
        if held is None:
            return []
        lost = [(job_id, task_id) for job_id, task_id in waiting if task_id not in held]
        for job_id, task_id in lost:
            log.warning("job %s is queued but the broker holds no message for it; sending one", job_id)
            self._send(job_id, task_id)
        return [job_id for job_id, _ in lost]

    def sweep(self) -> list[str]:
        with session_scope(self.settings.database_url) as session:
            return disk.sweep(session, self.settings.artifact_dir) + disk.empty_trash(
                session, self.settings.artifact_dir
            )

    def expire(self) -> list[str]:
        """Delete the artifacts past the retention period; their ids."""
        days = self.settings.artifact_retention_days
        if days is None:
            return []
        expired = []
        with session_scope(self.settings.database_url) as session:
            for artifact in jobs.expired_artifacts(session, older_than_days=days):
                if disk.delete_artifact(session, self.settings.artifact_dir, artifact.id, artifact.path):
                    log.info(
                        "artifact %s of job %s expired (older than %g days)",
                        artifact.id,
                        artifact.job_id,
                        days,
                    )
                    expired.append(artifact.id)
        return expired

    def _send(self, job_id: str, old_task_id: str | None) -> None:
        new = str(uuid.uuid4())
        with session_scope(self.settings.database_url) as session:
            if not recovery.replace_task_id(session, job_id, old_task_id, new):
                return  # another sweep re-sent it, or it started
        self.celery.send_task(TASK_RUN_JOB, args=[job_id], task_id=new, queue=self.settings.queue)
