from __future__ import annotations

from fastapi import APIRouter, status

from app import crud, schemas, services
from app.deps import SessionDep
from app.security import AdminPrincipal, CurrentPrincipal
from quantcore.spec import FASHION_MNIST_REFERENCE

router = APIRouter(prefix="/v1/references", tags=["references"])


@router.get("", response_model=schemas.ReferenceList)
def list_references(db: SessionDep, _principal: CurrentPrincipal) -> schemas.ReferenceList:
    """Registered reference sets of the Inception metrics (a job's `evaluation.reference`)."""
    return schemas.ReferenceList(
        items=[schemas.ReferenceOut.model_validate(r) for r in crud.list_references(db)],
        builtin=[FASHION_MNIST_REFERENCE],
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=schemas.ReferenceOut,
    responses={409: {"description": "The name is taken."}, 422: {"description": "Not a readable reference."}},
)
def register_reference(
    body: schemas.ReferenceRegister, db: SessionDep, principal: AdminPrincipal
) -> schemas.ReferenceOut:
    """Register an ADM-format .npz that the server (and the workers) can read; its sha256 is recorded."""
    return schemas.ReferenceOut.model_validate(services.register_reference(db, body, principal))
