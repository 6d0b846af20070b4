from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from app import schemas
from app.db import jobs
from app.db.models import JOB_STATES
from app.deps import SessionDep
from app.metrics import render_generation, render_jobs
from app.security import AdminPrincipal

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=schemas.Health)
async def healthz() -> schemas.Health:
    """The process is up (no dependencies checked). No authentication; answers on the event loop."""
    return schemas.Health()


@router.get(
    "/readyz",
    response_model=schemas.Readiness,
    responses={503: {"model": schemas.Readiness, "description": "A dependency or every worker is down."}},
)
async def readyz(request: Request) -> JSONResponse:
    """Database, broker and artifact storage are reachable and a worker is alive (heartbeats).
    No authentication; every probe is bounded in time."""
    body = await request.app.state.readiness.check()
    return JSONResponse(body.model_dump(), status_code=200 if body.status == "ok" else 503)


@router.get("/metrics", response_class=PlainTextResponse, responses=schemas.error_responses(401, 403))
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
