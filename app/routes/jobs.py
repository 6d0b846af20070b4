from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Header, HTTPException, Query, Response, status
from sqlalchemy.orm import Session

from app import redact, schemas, services
from app.db import jobs, recovery
from app.db.models import TERMINAL_STATES
from app.deps import CeleryDep, SessionDep, SettingsDep
from app.security import JobsPrincipal, Principal
from worker import disk

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=schemas.error_responses(401, 403))

NOT_FOUND = schemas.error_responses(404)


def _out(db: Session, job, principal: Principal, events=None) -> schemas.JobOut:
    return redact.job(services.job_out(job, events=events), redact.secrets_of(db, job, principal))


def _get_visible_job(db: Session, job_id: str, principal: Principal):
    job = jobs.get_job(db, job_id, owner=principal.owner_filter)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} not found")
    return job


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=schemas.JobOut,
    responses=schemas.error_responses(413, 422, 503),
)
def create_job(
    response: Response,
    spec: Annotated[schemas.JobSpec, Body(openapi_examples=schemas.JOB_SPEC_EXAMPLES)],
    db: SessionDep,
    celery: CeleryDep,
    settings: SettingsDep,
    principal: JobsPrincipal,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=255,
            pattern=r"^[\x21-\x7e]+$",
            description="Makes a retried request safe: the same key with the same body answers the job the "
            "first request made (200); with another body, 409. Keys are per owner and kept with the job.",
        ),
    ] = None,
) -> schemas.JobOut:
    """Queue a quantization job. Poll the `Location` for its state, or give a `webhook`."""
    job, replayed = services.submit_job(db, celery, settings, spec, principal, idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if replayed:
        response.status_code = status.HTTP_200_OK
    return _out(db, job, principal)


@router.get("", response_model=schemas.JobList)
def list_jobs(
    db: SessionDep,
    principal: JobsPrincipal,
    state: Annotated[schemas.JobState | None, Query(description="Only jobs in this state.")] = None,
    model: Annotated[str | None, Query(max_length=128, description="Only jobs of this model.")] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
    offset: Annotated[int, Query(ge=0, le=2**63 - 1, description="Jobs to skip.")] = 0,
) -> schemas.JobList:
    """Your jobs (all jobs for admins), newest first."""
    page, total = jobs.list_jobs(
        db, owner=principal.owner_filter, state=state, model=model, limit=limit, offset=offset
    )
    return schemas.JobList(
        items=[_out(db, j, principal) for j in page], total=total, limit=limit, offset=offset
    )


@router.get("/{job_id}", response_model=schemas.JobOut, responses=NOT_FOUND)
def get_job(
    job_id: str,
    db: SessionDep,
    principal: JobsPrincipal,
) -> schemas.JobOut:
    job = _get_visible_job(db, job_id, principal)
    return _out(db, job, principal, events=jobs.list_events(db, job.id))


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=schemas.error_responses(404, 409),
)
def delete_job(job_id: str, db: SessionDep, settings: SettingsDep, principal: JobsPrincipal) -> Response:
    """Delete an ended job: its record, events and artifact (files too). A queued or running job is
    refused (409): cancel it first."""
    job = _get_visible_job(db, job_id, principal)
    if job.state not in TERMINAL_STATES:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"job {job_id} is {job.state}: cancel it (POST /v1/jobs/{job_id}/cancel) and delete it "
            "once it has ended",
        )
    disk.delete_job(db, settings.artifact_dir, job.id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=schemas.JobOut,
    responses=schemas.error_responses(404, 409),
)
def cancel_job(
    job_id: str,
    db: SessionDep,
    settings: SettingsDep,
    principal: JobsPrincipal,
) -> schemas.JobOut:
    """Cancel a job: a queued job ends at once; a running one stops at its next checkpoint (at once if
    its worker was lost)."""
    job = _get_visible_job(db, job_id, principal)
    if job.state in ("succeeded", "failed", "canceled"):
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"job {job_id} already ended ({job.state})")
    job = jobs.request_cancel(db, job)
    if recovery.lease_expired(job, settings.job_lease_seconds) and recovery.cancel_orphaned(
        db, job, actor=None
    ):
        job = jobs.get_job(db, job.id)
    return _out(db, job, principal)
