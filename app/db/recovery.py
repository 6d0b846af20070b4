"""The reads and writes of recovery: worker heartbeats, jobs of lost workers, jobs whose broker message
was lost, and what the disk sweep needs to know. Every change of a job is a compare-and-set through
``app.db.jobs.transition``, so any number of workers may run the same sweep at once.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app.db import jobs
from app.db.models import Artifact, Job, Worker, utcnow

# ----------------------------------------------------------------------------------------- workers


def beat(session: Session, *, name: str, pid: int, queue: str) -> None:
    """Record that worker ``name`` is alive now (insert its row on the first beat)."""
    now = utcnow()
    result = session.execute(
        update(Worker).where(Worker.name == name).values(pid=pid, queue=queue, heartbeat_at=now)
    )
    if result.rowcount == 0:
        session.add(Worker(name=name, pid=pid, queue=queue, started_at=now, heartbeat_at=now))
    session.commit()


def forget_worker(session: Session, name: str) -> None:
    session.execute(delete(Worker).where(Worker.name == name))
    session.commit()


def live_workers(session: Session, *, within_seconds: float) -> list[Worker]:
    cutoff = utcnow() - dt.timedelta(seconds=within_seconds)
    return list(session.scalars(select(Worker).where(Worker.heartbeat_at >= cutoff).order_by(Worker.name)))


def prune_workers(session: Session, *, older_than_seconds: float) -> None:
    """Forget workers that died without saying so (kill -9) long ago."""
    cutoff = utcnow() - dt.timedelta(seconds=older_than_seconds)
    session.execute(delete(Worker).where(Worker.heartbeat_at < cutoff))
    session.commit()


# -------------------------------------------------------------------------------------------- jobs


def _lost(job: Job) -> str:
    age = (utcnow() - (job.heartbeat_at or job.updated_at)).total_seconds()
    return f"attempt {job.attempt} on {job.worker} sent no heartbeat for {age:.0f}s (worker lost)"


def requeue_expired(session: Session, job: Job, *, actor: str) -> bool:
    """running -> queued for a job whose lease expired; True if this call made the change."""
    return jobs.transition(
        session,
        job.id,
        ("running",),
        "queued",
        expected_attempt=job.attempt,
        actor=actor,
        message=f"lease expired: {_lost(job)}; queued again, it restarts from the beginning",
        stage="requeued",
        progress=0.0,
        eta_seconds=None,
    )


def cancel_orphaned(session: Session, job: Job, *, actor: str | None) -> bool:
    """running -> canceled for a job asked to cancel whose worker is gone (nobody else would end it)."""
    return jobs.transition(
        session,
        job.id,
        ("running",),
        "canceled",
        expected_attempt=job.attempt,
        actor=actor,
        message=f"canceled on request; its worker was lost: {_lost(job)}",
    )


def lease_expired(job: Job, lease_seconds: float) -> bool:
    beat_at = job.heartbeat_at or job.updated_at
    return job.state == "running" and (utcnow() - beat_at).total_seconds() > lease_seconds


def queued_since(session: Session, *, seconds: float) -> list[Job]:
    """Jobs queued (or queued again) at least ``seconds`` ago, oldest first."""
    cutoff = utcnow() - dt.timedelta(seconds=seconds)
    query = select(Job).where(Job.state == "queued", Job.updated_at < cutoff).order_by(Job.created_at)
    return list(session.scalars(query))


def replace_task_id(session: Session, job_id: str, old: str | None, new: str) -> bool:
    """Compare-and-set the task id of a queued job: of many sweeps re-sending it, one wins."""
    same = Job.task_id.is_(None) if old is None else Job.task_id == old
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.state == "queued", same).values(task_id=new)
    )
    session.commit()
    return result.rowcount == 1


# -------------------------------------------------------------------------------------------- disk


def job_and_artifact(session: Session, job_id: str) -> tuple[Job | None, Artifact | None]:
    job = session.get(Job, job_id, populate_existing=True)
    return job, (job.artifact if job is not None else None)
