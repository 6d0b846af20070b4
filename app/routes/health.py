from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from app import schemas
from app.metrics import CONTENT_TYPE
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
def metrics(request: Request, _principal: AdminPrincipal) -> Response:
    """Prometheus metrics (needs an admin key: configure the scraper's bearer token). Job durations,
    queue waits and worker heartbeats are read from the database, so they cover every worker."""
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE)
