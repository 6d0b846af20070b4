"""The FastAPI application: `uvicorn --factory app.main:create_app`."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import OperationalError

from app import services, web
from app.config import Settings, get_settings
from app.db.session import get_sessionmaker, session_scope
from app.edge import EdgeMiddleware, database_unavailable, validation_error
from app.generation import GeneratorCache
from app.metrics import Metrics, MetricsMiddleware
from app.readiness import Readiness
from app.routes import artifacts, docs, generate, health, jobs, models, references, webhooks
from worker.celery_app import make_celery

log = logging.getLogger(__name__)

WORKER_STOP_S = 2.0  # SIGTERM to exit stays under 10 s: request grace + this + the KILL


def create_app(settings: Settings | None = None, *, run_worker: bool = False) -> FastAPI:
    """The API. ``run_worker`` (embedded mode): start a worker child at startup, stop it at shutdown."""
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            settings.artifact_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # /readyz reports it; the process still answers /healthz
            log.error("artifact folder %s is not usable: %s", settings.artifact_dir, e)
        if settings.register_models_at_startup:
            try:
                with session_scope(settings.database_url) as db:
                    n = services.sync_registry(db, settings)
                log.info("registered %d registry models", n)
            except Exception:
                log.exception("could not sync the model registry; GET /v1/models may be incomplete")
        worker, watcher = None, None
        if run_worker:
            from app.worker_cmd import SupervisedWorker

            worker = SupervisedWorker(settings, hostname="embedded@%h")
            worker.start()
            watcher = asyncio.create_task(worker.watch())
            app.state.worker = worker
        try:
            yield
        finally:
            app.state.generators.close()
            if watcher is not None:
                watcher.cancel()
                # a job it runs is left to its lease: the next worker's reconciler takes it over
                worker.stop(timeout=WORKER_STOP_S)

    app = FastAPI(
        title="ptq4arvg",
        version="0.1.0",
        description="Post-training quantization jobs, artifacts and generation for autoregressive image "
        "generators (PTQ4ARVG). Every route but /healthz and /readyz needs `Authorization: Bearer <key>`.",
        lifespan=lifespan,
        docs_url=None,  # served from local assets by app.routes.docs
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.sessionmaker = get_sessionmaker(settings.database_url)
    app.state.celery = make_celery(settings)
    app.state.generators = GeneratorCache(settings)
    app.state.readiness = Readiness(app.state.sessionmaker, settings)
    app.state.metrics = Metrics(app.state.sessionmaker, app.state.generators)
    app.state.generators.on_batch = app.state.metrics.observe_batch
    app.add_middleware(EdgeMiddleware, max_bytes=settings.max_request_bytes)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(OperationalError, database_unavailable)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    for router in (
        health.router,
        jobs.router,
        artifacts.router,
        models.router,
        references.router,
        generate.router,
        webhooks.router,
        docs.router,
        web.router,
    ):
        app.include_router(router)
    app.mount(docs.STATIC_URL, docs.static_files(), name="static")
    return app
