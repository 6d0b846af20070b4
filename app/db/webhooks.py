"""The webhook outbox: rows written in the transaction of the job change they report, claimed and
updated by the workers' delivery thread (worker/webhooks.py) with compare-and-set writes, so many
workers may deliver at once and a killed one's claim runs out and is taken again."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select, update
from sqlalchemy.orm import Session, aliased

from app.db.models import Job, WebhookDelivery, utcnow


def enqueue(session: Session, job_id: str, event: str) -> None:
    """Add the call that reports ``event`` of the job, if its spec asks for a webhook and that event; the
    caller commits it with the change it reports."""
    from app.webhooks import body_of, wants  # the rendering is the API's JobOut; imported at call time

    job = session.get(Job, job_id, populate_existing=True)
    if job is None or not wants(job.spec, event):
        return
    session.add(
        WebhookDelivery(
            job_id=job_id,
            event=event,
            url=job.spec["webhook"],
            body=body_of(session, job, event),
            attempts=0,
            next_attempt_at=utcnow(),
        )
    )


def due(session: Session, *, limit: int) -> list[WebhookDelivery]:
    """Calls whose next attempt is due, oldest first; a job's calls go in order (one waits while an
    earlier call of its job is still to be delivered)."""
    earlier = aliased(WebhookDelivery)
    pending_before = (
        select(earlier.id)
        .where(
            earlier.job_id == WebhookDelivery.job_id,
            earlier.id < WebhookDelivery.id,
            earlier.next_attempt_at.is_not(None),
        )
        .exists()
    )
    query = (
        select(WebhookDelivery)
        .where(WebhookDelivery.next_attempt_at <= utcnow(), ~pending_before)
        .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
        .limit(limit)
    )
    rows = list(session.scalars(query))
    session.expunge_all()  # the caller uses them after this session ends
    return rows


def claim(session: Session, delivery: WebhookDelivery, *, hold_seconds: float) -> bool:
    """Take a due call for ``hold_seconds`` (a killed deliverer's claim then runs out); True if this
    caller got it."""
    result = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery.id, WebhookDelivery.next_attempt_at == delivery.next_attempt_at)
        .values(next_attempt_at=utcnow() + dt.timedelta(seconds=hold_seconds))
    )
    session.commit()
    return result.rowcount == 1


def record_attempt(
    session: Session,
    delivery_id: int,
    *,
    status: int | None,
    error: str | None,
    retry_in_seconds: float | None,
) -> None:
    """The outcome of one attempt: delivered (no error), retried after ``retry_in_seconds``, or given up
    (None)."""
    now = utcnow()
    values = {
        "attempts": WebhookDelivery.attempts + 1,
        "last_status": status,
        "last_error": error,
        "next_attempt_at": None if retry_in_seconds is None else now + dt.timedelta(seconds=retry_in_seconds),
    }
    if error is None:
        values["delivered_at"] = now
    session.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(**values))
    session.commit()


def for_job(session: Session, job_id: str) -> list[WebhookDelivery]:
    query = select(WebhookDelivery).where(WebhookDelivery.job_id == job_id).order_by(WebhookDelivery.id)
    return list(session.scalars(query))
