"""What the routers do beyond one query: resolve models, submit jobs, register checkpoints.

The engine's registry (``quantcore.registry``) is imported lazily, never at module import time.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import uuid
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from celery import Celery
from fastapi import HTTPException, status
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import checkpoints, crud, schemas
from app.config import Settings
from app.db import jobs
from app.db.models import EvalReference, Job, Model
from app.security import Principal
from app.storage import sha256_file
from quantcore.spec import FASHION_MNIST_REFERENCE
from worker.celery_app import TASK_RUN_JOB

log = logging.getLogger(__name__)


def field_error(
    loc: tuple[str | int, ...], msg: str, *, code: int = 422, kind: str = "value_error"
) -> HTTPException:
    """An error shaped like FastAPI's own validation errors, naming the offending field."""
    return HTTPException(code, detail=[{"type": kind, "loc": list(loc), "msg": msg}])


# ------------------------------------------------------------------------------------------ models


def sync_registry(db: Session, settings: Settings) -> int:
    """Insert/refresh the engine's registry entries (bundled models included). Returns how many."""
    try:
        registry = importlib.import_module(settings.registry_module)
    except ImportError as e:
        log.warning(
            "model registry %s is not importable (%s); no models registered", settings.registry_module, e
        )
        return 0
    entries = registry.list_models()
    for entry in entries:
        crud.upsert_registry_model(db, entry)
    return len(entries)


def server_file(text: str, loc: tuple[str, ...]) -> tuple[Path, int, str]:
    """(path, size, sha256) of a file the server can read, given by a client at `loc`; 422 otherwise."""
    path = Path(text)
    if not path.is_absolute():
        raise field_error(loc, "give an absolute path on the server")
    try:
        if not path.is_file():
            raise OSError("not a regular file")
        return path, path.stat().st_size, sha256_file(path)
    except OSError as e:
        raise field_error(loc, f"the server cannot read '{path}': {getattr(e, 'strerror', None) or e}") from e


def register_checkpoint(
    db: Session, settings: Settings, body: schemas.ModelRegister, principal: Principal
) -> Model:
    if crud.get_model(db, body.name) is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"a model named '{body.name}' already exists")
    base = crud.get_model(db, body.base_model)
    if base is None or base.source != "registry":
        raise field_error(
            ("body", "base_model"), f"unknown base model '{body.base_model}'; see GET /v1/models"
        )
    try:
        registered = checkpoints.check_file(body.checkpoint_path, settings.checkpoint_roots, base.name)
    except checkpoints.Refused as e:
        raise field_error(("body", "checkpoint_path"), str(e)) from e
    return crud.register_checkpoint(
        db,
        name=body.name,
        base=base,
        path=str(registered.path),
        sha256=registered.sha256,
        size=registered.size,
        registered_by=principal.owner,
    )


# -------------------------------------------------------------------------------------- references


def _npz_contents(path: Path) -> dict[str, Any]:
    """The arrays of an ADM-format .npz and its image count, read from the zip directory and one
    header (never the data); ValueError when it is not such a file."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = {n.removesuffix(".npy") for n in archive.namelist() if n.endswith(".npy")}
            count = None
            if "arr_0" in names:
                with archive.open("arr_0.npy") as f:
                    version = np.lib.format.read_magic(f)
                    if version != (1, 0) and version != (2, 0):
                        raise ValueError(f"arr_0 has unsupported .npy version {version}")
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read_header(f)
                if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
                    raise ValueError(f"arr_0 must hold uint8 images (N, H, W, 3), got {dtype} {shape}")
                count = shape[0]
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"not an .npz file ({e})") from e
    if not ({"mu", "sigma"} <= names or "arr_0" in names):
        raise ValueError(f"neither statistics (mu, sigma) nor images (arr_0); it holds {sorted(names)}")
    return {"arrays": sorted(names), "num_images": count}


def register_reference(db: Session, body: schemas.ReferenceRegister, principal: Principal) -> EvalReference:
    if crud.find_reference(db, body.name) is not None or body.name == FASHION_MNIST_REFERENCE:
        raise HTTPException(
            status.HTTP_409_CONFLICT, detail=f"a reference named '{body.name}' already exists"
        )
    path, size, digest = server_file(body.path, ("body", "path"))
    try:
        info = _npz_contents(path)
    except ValueError as e:
        raise field_error(("body", "path"), f"'{path}' is not an ADM-format reference: {e}") from e
    return crud.register_reference(
        db, name=body.name, path=str(path), sha256=digest, size=size, info=info, registered_by=principal.owner
    )


def resolve_reference(db: Session, ref: str | None) -> str | None:
    """The engine's `evaluation.reference`: a registered reference's path, or the engine's built-in one."""
    if ref is None or ref == FASHION_MNIST_REFERENCE:
        return ref
    reference = crud.find_reference(db, ref)
    if reference is None:
        raise field_error(
            ("body", "evaluation", "reference"),
            f"unknown reference '{ref}'; register it first with POST /v1/references",
        )
    return reference.path


# -------------------------------------------------------------------------------------------- jobs


def build_engine_spec(db: Session, spec: schemas.JobSpec) -> tuple[dict[str, Any], str | None]:
    """The dict quantcore.api.quantize_job receives, and the sha256 of its checkpoint (if any)."""
    model = crud.get_model(db, spec.model)
    if model is None:
        raise field_error(("body", "model"), f"unknown model '{spec.model}'; see GET /v1/models")
    base_name, checkpoint, sha = model.name, None, None
    if model.source == "checkpoint":
        base_name, checkpoint, sha = model.base_model, model.checkpoint_path, model.checkpoint_sha256
    if spec.checkpoint is not None:
        ckpt = crud.find_checkpoint(db, spec.checkpoint)
        if ckpt is None:
            raise field_error(
                ("body", "checkpoint"),
                f"unknown checkpoint '{spec.checkpoint}'; register it first with POST /v1/models",
            )
        if ckpt.base_model != base_name:
            raise field_error(
                ("body", "checkpoint"),
                f"checkpoint '{ckpt.name}' is for model '{ckpt.base_model}', not '{base_name}'",
            )
        checkpoint, sha = ckpt.checkpoint_path, ckpt.checkpoint_sha256
    base = model if model.source == "registry" else crud.get_model(db, base_name)
    if spec.evaluation.lacks_reference(bundled=base is not None and base.bundled):
        raise field_error(
            ("body", "evaluation", "reference"),
            f"{', '.join(spec.evaluation.metrics)} need a reference for '{base_name}' (only the bundled models "
            "have a default); register one with POST /v1/references and name it here",
        )
    job = {**spec.engine_dict(), "model": base_name, "checkpoint": checkpoint}
    job["evaluation"]["reference"] = resolve_reference(db, spec.evaluation.reference)
    return job, sha


def _replayed(db: Session, owner: str, key: str, request_sha256: str) -> Job | None:
    """The job an earlier request with this Idempotency-Key made; 409 if that request's body differed."""
    job = jobs.find_by_idempotency_key(db, owner, key)
    if job is not None and job.request_sha256 != request_sha256:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"Idempotency-Key '{key}' was already used with another body (job {job.id}); "
            "use a new key for a new job",
        )
    return job


def submit_job(
    db: Session,
    celery: Celery,
    settings: Settings,
    spec: schemas.JobSpec,
    principal: Principal,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Record and queue a job; (the job, whether it was made by an earlier request with the same key)."""
    if spec.webhook is not None and not settings.webhook_secret:
        raise field_error(
            ("body", "webhook"), "this server signs no webhooks (PTQ4ARVG_WEBHOOK_SECRET is not set)"
        )
    body = spec.model_dump(mode="json")
    request_sha256 = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    if idempotency_key is not None:
        earlier = _replayed(db, principal.owner, idempotency_key, request_sha256)
        if earlier is not None:
            return earlier, True
    engine_spec, sha = build_engine_spec(db, spec)
    try:
        job = jobs.create_job(
            db,
            owner=principal.owner,
            spec=body,
            recipe=spec.recipe_name,
            engine_spec=engine_spec,
            checkpoint_sha256=sha,
            idempotency_key=idempotency_key,
            request_sha256=request_sha256 if idempotency_key is not None else None,
        )
    except IntegrityError:  # a concurrent request with the same key won the insert
        db.rollback()
        earlier = _replayed(db, principal.owner, idempotency_key, request_sha256)
        if earlier is None:
            raise
        return earlier, True
    task_id = str(uuid.uuid4())
    try:
        celery.send_task(
            TASK_RUN_JOB,
            args=[job.id],
            task_id=task_id,
            queue=settings.queue,
            ignore_result=True,  # nobody reads it; a result backend that is down would stall the call
            retry=True,
            retry_policy={"max_retries": 1, "interval_start": 0.2, "interval_step": 0, "interval_max": 0.2},
        )
    except Exception as e:
        # The job stays queued: the workers' reconciler sends its message once the broker is back.
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail=f"the job queue is unreachable ({type(e).__name__}: {e}); job {job.id} is recorded "
            f"and starts once the queue is back (GET /v1/jobs/{job.id}): do not submit it again",
            headers={"Location": f"/v1/jobs/{job.id}", "Retry-After": "10"},
        ) from e
    jobs.set_task_id(db, job.id, task_id)
    return jobs.get_job(db, job.id), False


def job_out(job: Job, *, events: list | None = None) -> schemas.JobOut:
    error = None
    if job.error_message:
        error = schemas.JobError(kind=job.error_kind or "internal", message=job.error_message)
    return schemas.JobOut(
        id=job.id,
        owner=job.owner,
        state=job.state,
        spec=schemas.JobSpec.model_validate(job.spec),
        progress=schemas.JobProgress(
            stage=job.stage,
            stage_percent=round(100.0 * (job.stage_progress or 0.0), 2),
            percent=round(100.0 * (job.progress or 0.0), 2),
            eta_seconds=job.eta_seconds,
            heartbeat_at=job.heartbeat_at,
        ),
        cancel_requested=job.cancel_requested,
        attempt=job.attempt,
        worker=job.worker,
        device=job.device,
        error=error,
        artifact_id=job.artifact.id if job.artifact is not None else None,
        metrics=job.metrics,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        events=[schemas.JobEventOut.model_validate(e) for e in events] if events is not None else None,
    )
