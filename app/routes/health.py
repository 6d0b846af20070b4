from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from app import schemas, services
from app.db import jobs
from app.db.models import JOB_STATES
from app.deps import SessionDep, SettingsDep
from app.metrics import render_generation, render_jobs
from app.security import AdminPrincipal

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=schemas.Health)
def healthz() -> schemas.Health:
    """The process is up (no dependencies checked). No authentication."""
    return schemas.Health()


@router.get("/readyz", response_model=schemas.Readiness, responses={503: {"model": schemas.Readiness}})
def readyz(db: SessionDep, settings: SettingsDep) -> JSONResponse:
    """Database, broker and artifact storage are reachable. No authentication."""
    checks = {
        "database": services.check_database(db),
        "broker": services.check_broker(settings),
        "storage": services.check_storage(settings),
    }
    ok = all(c.ok for c in checks.values())
    body = schemas.Readiness(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(
    request: Request,
    db: SessionDep,
    _principal: AdminPrincipal,
) -> PlainTextResponse:
    """Prometheus metrics (needs an admin key: configure the scraper's bearer token)."""
    lines = request.app.state.metrics.render()
    lines += render_jobs(jobs.job_counts_by_state(db), JOB_STATES)
    lines += render_generation(request.app.state.generators)
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4; charset=utf-8")
