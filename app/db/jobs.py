"""The job state machine and artifact records: every read and write of jobs, their events and artifacts.

The API and the worker both go through here. State changes of a job are compare-and-set UPDATEs
(``WHERE state = ... AND attempt = ...``), so two workers that got the same task can never both move a
job, and each change writes a job_events row in the same transaction.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.db.models import TERMINAL_STATES, Artifact, Job, JobEvent, utcnow

# -------------------------------------------------------------------------------------------- jobs


def _event(
    session: Session,
    job_id: str,
    from_state: str | None,
    to_state: str,
    attempt: int,
    *,
    worker: str | None = None,
    message: str | None = None,
) -> None:
    session.add(
        JobEvent(
            job_id=job_id,
            from_state=from_state,
            to_state=to_state,
            attempt=attempt,
            worker=worker,
            message=message,
        )
    )


def create_job(
    session: Session,
    *,
    owner: str,
    spec: dict[str, Any],
    recipe: str,
    engine_spec: dict[str, Any],
    checkpoint_sha256: str | None = None,
) -> Job:
    job = Job(
        checkpoint_sha256=checkpoint_sha256,
        owner=owner,
        model=spec["model"],
        recipe=recipe[:32],
        w_bits=spec["w_bits"],
        a_bits=spec.get("a_bits"),
        spec=spec,
        engine_spec=engine_spec,
        state="queued",
        progress=0.0,
        cancel_requested=False,
        attempt=0,
    )
    session.add(job)
    session.flush()
    _event(session, job.id, None, "queued", 0, message="job accepted")
    session.commit()
    return job


def set_task_id(session: Session, job_id: str, task_id: str) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(task_id=task_id))
    session.commit()


def get_job(session: Session, job_id: str, *, owner: str | None = None) -> Job | None:
    """A job by id; with ``owner``, only if it belongs to that owner (None = any owner, for admins)."""
    query = select(Job).where(Job.id == job_id)
    if owner is not None:
        query = query.where(Job.owner == owner)
    return session.scalar(query.execution_options(populate_existing=True))


def list_jobs(
    session: Session,
    *,
    owner: str | None,
    state: str | None = None,
    model: str | None = None,
    limit: int = 20,
    offset: int = 0,
) -> tuple[list[Job], int]:
    query = select(Job)
    if owner is not None:
        query = query.where(Job.owner == owner)
    if state is not None:
        query = query.where(Job.state == state)
    if model is not None:
        query = query.where(Job.model == model)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit).offset(offset))
    return list(rows), total


def list_events(session: Session, job_id: str) -> list[JobEvent]:
    return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def job_counts_by_state(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.state, func.count()).group_by(Job.state))
    return {state: count for state, count in rows}


def transition(
    session: Session,
    job_id: str,
    from_states: Iterable[str],
    to_state: str,
    *,
    expected_attempt: int | None = None,
    actor: str | None = None,
    message: str | None = None,
    **values: Any,
) -> bool:
    """Compare-and-set the job's state; True if this call made the change (and wrote its event).

    ``expected_attempt`` also requires the job's attempt number to match (the caller owns the job).
    """
    from_states = tuple(from_states)
    now = utcnow()
    query = update(Job).where(Job.id == job_id, Job.state.in_(from_states))
    if expected_attempt is not None:
        query = query.where(Job.attempt == expected_attempt)
    if to_state in TERMINAL_STATES:
        values.setdefault("finished_at", now)
        values.setdefault("eta_seconds", None)
    result = session.execute(
        query.values(state=to_state, updated_at=now, **values).execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        session.rollback()
        return False
    current = session.scalar(select(Job.attempt).where(Job.id == job_id))
    from_state = from_states[0] if len(from_states) == 1 else None
    _event(session, job_id, from_state, to_state, current or 0, worker=actor, message=message)
    session.commit()
    return True


def request_cancel(session: Session, job: Job) -> Job:
    """Cancel a queued job at once; ask a running one to stop (the worker checks the flag)."""
    if job.state == "queued" and transition(
        session, job.id, ("queued",), "canceled", cancel_requested=True, message="canceled before it started"
    ):
        return get_job(session, job.id)
    result = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.state.in_(("queued", "running")), Job.cancel_requested.is_(False))
        .values(cancel_requested=True, updated_at=utcnow())
    )
    if result.rowcount == 1:
        session.commit()
    return get_job(session, job.id)


def claim_job(
    session: Session,
    job_id: str,
    *,
    expected_state: str,
    expected_attempt: int,
    worker: str,
    message: str | None = None,
) -> int | None:
    """Take a queued job (or a running job whose worker was lost); returns the new attempt number."""
    now = utcnow()
    new_attempt = expected_attempt + 1
    values: dict[str, Any] = {
        "attempt": new_attempt,
        "worker": worker,
        "heartbeat_at": now,
        "stage": "starting",
        "stage_started_at": now,
        "progress": 0.0,
        "stage_progress": 0.0,
        "device": None,
        "eta_seconds": None,
    }
    if expected_state == "queued":
        values["started_at"] = now
    ok = transition(
        session,
        job_id,
        (expected_state,),
        "running",
        expected_attempt=expected_attempt,
        actor=worker,
        message=message,
        **values,
    )
    return new_attempt if ok else None


def _owned(job_id: str, attempt: int):
    return (Job.id == job_id, Job.state == "running", Job.attempt == attempt)


def update_progress(
    session: Session,
    job_id: str,
    attempt: int,
    *,
    stage: str,
    stage_progress: float,
    progress: float,
    eta_seconds: float | None,
    stage_started_at: dt.datetime,
) -> bool:
    """Record progress (the stage's and the job's) and refresh the heartbeat; False if this attempt no
    longer owns the job."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(*_owned(job_id, attempt))
        .values(
            stage=stage,
            stage_progress=stage_progress,
            progress=progress,
            eta_seconds=eta_seconds,
            stage_started_at=stage_started_at,
            heartbeat_at=now,
            updated_at=now,
        )
    )
    session.commit()
    return result.rowcount == 1


def set_device(session: Session, job_id: str, attempt: int, device: dict[str, Any]) -> bool:
    """Record where this attempt runs (device and GPU model); False if it no longer owns the job."""
    result = session.execute(update(Job).where(*_owned(job_id, attempt)).values(device=device))
    session.commit()
    return result.rowcount == 1


def heartbeat(session: Session, job_id: str, attempt: int) -> bool:
    result = session.execute(update(Job).where(*_owned(job_id, attempt)).values(heartbeat_at=utcnow()))
    session.commit()
    return result.rowcount == 1


def should_stop(session: Session, job_id: str, attempt: int) -> bool:
    """True if a cancel was asked for, or if this attempt no longer owns the job."""
    row = session.execute(
        select(Job.state, Job.attempt, Job.cancel_requested).where(Job.id == job_id)
    ).one_or_none()
    session.rollback()  # end the read transaction so the next call sees fresh data
    if row is None:
        return True
    state, current_attempt, cancel = row
    return bool(cancel) or state != "running" or current_attempt != attempt


def finish_succeeded(
    session: Session,
    job_id: str,
    attempt: int,
    *,
    worker: str,
    artifact_id: str,
    owner: str,
    path: str,
    manifest: dict[str, Any],
    files: list[dict[str, Any]],
    metrics: dict[str, Any] | None,
) -> bool:
    """Mark the job succeeded and record its artifact in one transaction (CAS on the attempt)."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(*_owned(job_id, attempt))
        .values(
            state="succeeded",
            stage="done",
            progress=1.0,
            eta_seconds=None,
            metrics=metrics,
            finished_at=now,
            updated_at=now,
            error_kind=None,
            error_message=None,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        session.rollback()
        return False
    session.add(
        Artifact(
            id=artifact_id,
            job_id=job_id,
            owner=owner,
            path=path,
            manifest=manifest,
            files=files,
            total_bytes=sum(int(f["size"]) for f in files),
        )
    )
    _event(session, job_id, "running", "succeeded", attempt, worker=worker, message=f"artifact {artifact_id}")
    session.commit()
    return True


def stale_running_jobs(session: Session, *, lease_seconds: float) -> list[Job]:
    cutoff = utcnow() - dt.timedelta(seconds=lease_seconds)
    return list(session.scalars(select(Job).where(Job.state == "running", Job.heartbeat_at < cutoff)))


def queued_jobs(session: Session) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.state == "queued")))


# --------------------------------------------------------------------------------------- artifacts


def get_artifact(session: Session, artifact_id: str, *, owner: str | None = None) -> Artifact | None:
    query = select(Artifact).where(Artifact.id == artifact_id)
    if owner is not None:
        query = query.where(Artifact.owner == owner)
    return session.scalar(query)


def list_artifacts(
    session: Session, *, owner: str | None, model: str | None = None, limit: int = 100
) -> list[Artifact]:
    """Artifacts, newest first; with ``owner``, only that owner's; with ``model``, only of that model."""
    query = select(Artifact).join(Job, Artifact.job_id == Job.id)
    if owner is not None:
        query = query.where(Artifact.owner == owner)
    if model is not None:
        query = query.where(Job.model == model)
    return list(session.scalars(query.order_by(Artifact.created_at.desc(), Artifact.id.desc()).limit(limit)))
