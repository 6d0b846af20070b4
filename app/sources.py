"""What POST /v1/generate may load: a model or an artifact resolved to a Source whose files and hashes
come from the database, and the checks on its request (weights present, classes, sampling settings).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fastapi import HTTPException, status
from sqlalchemy.orm import Session

from app import crud, schemas
from app.config import Settings
from app.db import jobs
from app.db.models import Model
from app.generation import FP32_BYTES, RecordedFile, Source
from app.security import Principal
from app.services import field_error
from app.storage import UnsafeName, artifact_file

# Sampling values the engine samples safely with; its own rules (temperature > 0, top_p <= 1) follow.
INT_RANGE = (-1, 2**31 - 1)  # -1 = "off" (cfg_interval); top_k and friends are counts
FLOAT_RANGE = (0.0, 1e6)  # every float setting (scales, temperature, top_p, exponents) is >= 0


def _random_weights_refused(what: str, loc: tuple[str, ...]) -> Exception:
    return field_error(
        loc,
        f"{what} has no weights on this server: it would run with random weights and draw noise. "
        "Register a checkpoint for it (POST /v1/models) and generate from that; an administrator can "
        "allow random weights with PTQ4ARVG_GENERATE_RANDOM_WEIGHTS=true.",
    )


def _base(db: Session, model: Model) -> Model:
    """The registry entry a model is built from (a registered checkpoint names its base model)."""
    if model.source == "registry":
        return model
    return crud.get_model(db, model.base_model) or model


def _estimate(base: Model) -> int | None:
    return base.parameters * FP32_BYTES if base.parameters else None


def resolve(
    db: Session, settings: Settings, body: schemas.GenerateRequest, principal: Principal
) -> tuple[Source, Model]:
    """The Source to generate from and the registry model whose sampling settings apply."""
    if body.artifact_id is not None:
        return _artifact_source(db, settings, body.artifact_id, principal)
    model = crud.get_model(db, body.model)
    if model is None:
        raise field_error(("body", "model"), f"unknown model '{body.model}'; see GET /v1/models")
    base = _base(db, model)
    if model.source == "checkpoint":
        checkpoint = Path(model.checkpoint_path)
        files = (RecordedFile(checkpoint, model.checkpoint_size, model.checkpoint_sha256),)
        source = Source(
            f"checkpoint:{model.checkpoint_sha256}",
            model.name,
            model.base_model,
            str(checkpoint),
            files,
            _estimate(base),
        )
        return source, base
    if not model.bundled and not settings.generate_random_weights:
        raise _random_weights_refused(f"model '{model.name}'", ("body", "model"))
    return Source(f"model:{model.name}", model.name, model.name, None, (), _estimate(base)), base


def _artifact_source(
    db: Session, settings: Settings, artifact_id: str, principal: Principal
) -> tuple[Source, Model]:
    artifact = jobs.get_artifact(db, artifact_id, owner=principal.owner_filter)
    if artifact is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"artifact {artifact_id} not found")
    engine_spec = artifact.job.engine_spec or {}
    base = crud.get_model(db, engine_spec.get("model", ""))
    if base is None:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"artifact {artifact_id} was made from model '{engine_spec.get('model')}', "
            "which this server no longer knows",
        )
    if engine_spec.get("checkpoint") is None and not base.bundled and not settings.generate_random_weights:
        raise _random_weights_refused(
            f"artifact {artifact_id} (quantized from '{base.name}' without a checkpoint)",
            ("body", "artifact_id"),
        )
    try:
        files = tuple(
            RecordedFile(
                artifact_file(settings.artifact_dir, artifact.path, f["name"]), f["size"], f["sha256"]
            )
            for f in artifact.files
        )
    except UnsafeName as e:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"artifact {artifact_id}: {e}") from e
    folder = str((Path(settings.artifact_dir) / artifact.path).resolve())
    return Source(f"artifact:{artifact.id}", artifact.id, folder, None, files, _estimate(base)), base


def check_request(body: schemas.GenerateRequest, base: Model) -> None:
    """Classes within the model's labels; sampling settings the model knows, of the types it takes."""
    num_classes = (base.info.get("config") or {}).get("num_classes")
    if num_classes is not None:
        for i, label in enumerate(body.classes):
            if label >= num_classes:
                raise field_error(
                    ("body", "classes", i),
                    f"class {label} out of range: this model has classes 0..{num_classes - 1}",
                )
    defaults = base.info.get("sampling")
    if defaults is None:  # the engine checks the names then
        return
    for key, value in body.sampling.items():
        loc = ("body", "sampling", key)
        if key not in defaults:
            raise field_error(
                loc, f"unknown sampling parameter; {base.name} takes {', '.join(sorted(defaults))}"
            )
        problem = _sampling_problem(defaults[key], value)
        if problem:
            raise field_error(loc, problem)


def _sampling_problem(default: Any, value: Any) -> str | None:
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            return "must be an integer"
        low, high = INT_RANGE
        return None if low <= value <= high else f"must be an integer from {low} to {high}"
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "must be a number"
        low, high = FLOAT_RANGE
        ok = math.isfinite(value) and low <= value <= high
        return None if ok else f"must be a number from {low:g} to {high:g}"
    if isinstance(default, str):
        return None if isinstance(value, str) else "must be a string"
    return None
