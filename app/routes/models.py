from __future__ import annotations

from fastapi import APIRouter, status

from app import crud, schemas, services
from app.deps import SessionDep
from app.security import AdminPrincipal, CurrentPrincipal

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=schemas.ModelList)
def list_models(
    db: SessionDep,
    _principal: CurrentPrincipal,
) -> schemas.ModelList:
    """The registry (families, sizes, bundled models, official checkpoints) and registered checkpoints."""
    return schemas.ModelList(items=[schemas.ModelOut.model_validate(m) for m in crud.list_models(db)])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=schemas.ModelOut,
    responses={409: {"description": "The name is taken."}, 422: {"description": "Bad base model or path."}},
)
def register_model(
    body: schemas.ModelRegister,
    db: SessionDep,
    principal: AdminPrincipal,
) -> schemas.ModelOut:
    """Register a checkpoint file that the server (and the workers) can read; its sha256 is recorded."""
    return schemas.ModelOut.model_validate(services.register_checkpoint(db, body, principal))
