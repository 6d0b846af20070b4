from __future__ import annotations

from fastapi import APIRouter, status

from app import crud, schemas, services
from app.deps import SessionDep, SettingsDep
from app.security import AdminPrincipal, CurrentPrincipal

router = APIRouter(prefix="/v1/models", tags=["models"], responses=schemas.error_responses(401, 403))


@router.get("", response_model=schemas.ModelList)
def list_models(
    db: SessionDep,
    principal: CurrentPrincipal,
) -> schemas.ModelList:
    """The registry (families, sizes, bundled models, official checkpoints) and registered checkpoints
    (their sha256 and size for admin keys only)."""
    items = [schemas.ModelOut.model_validate(m) for m in crud.list_models(db)]
    if not principal.is_admin:
        items = [m.model_copy(update={"checkpoint_sha256": None, "checkpoint_size": None}) for m in items]
    return schemas.ModelList(items=items)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=schemas.ModelOut,
    responses=schemas.error_responses(409, 413, 422),
)
def register_model(
    body: schemas.ModelRegister,
    db: SessionDep,
    settings: SettingsDep,
    principal: AdminPrincipal,
) -> schemas.ModelOut:
    """Register a checkpoint file below the server's checkpoint folders (PTQ4ARVG_CHECKPOINT_ROOTS) that
    server and workers can read; it must parse as a checkpoint of the base model. Its sha256 is recorded,
    and every later load is checked against it."""
    return schemas.ModelOut.model_validate(services.register_checkpoint(db, settings, body, principal))
