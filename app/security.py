"""API-key authentication: `Authorization: Bearer <token>`, keys stored as sha256, scopes per key."""

from __future__ import annotations

import dataclasses
from typing import Annotated

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app import crud
from app.deps import SessionDep

bearer = HTTPBearer(auto_error=False, description="An API key made by `ptq4arvg admin create-key`.")


@dataclasses.dataclass(frozen=True)
class Principal:
    key_id: int
    owner: str
    scopes: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    def holds(self, scope: str) -> bool:
        return scope in self.scopes or self.is_admin

    @property
    def owner_filter(self) -> str | None:
        """The owner whose rows this caller may see; None = everyone's (admins)."""
        return None if self.is_admin else self.owner


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"})


def get_principal(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    db: SessionDep,
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise _unauthorized("missing API key: send `Authorization: Bearer <key>`")
    principal = authenticate(db, credentials.credentials)
    if principal is None:
        raise _unauthorized("invalid or revoked API key")
    return principal


def authenticate(db: Session, token: str) -> Principal | None:
    """The principal of a live API key (bearer header or dashboard session); None if unknown/revoked."""
    key = crud.get_api_key_by_token(db, token)
    if key is None:
        return None
    crud.touch_api_key(db, key)
    return Principal(key_id=key.id, owner=key.owner, scopes=frozenset(key.scopes))


def check_scope(principal: Principal, scope: str) -> Principal:
    """``principal`` if it holds ``scope`` (admins hold every scope), else 403."""
    if not principal.holds(scope):
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail=f"this API key lacks the '{scope}' scope")
    return principal


def require_scope(scope: str):
    """A dependency that admits keys with ``scope`` (admins have every scope)."""

    def dependency(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        return check_scope(principal, scope)

    dependency.__name__ = f"require_scope_{scope}"
    return dependency


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]
JobsPrincipal = Annotated[Principal, Depends(require_scope("jobs"))]
GeneratePrincipal = Annotated[Principal, Depends(require_scope("generate"))]
AdminPrincipal = Annotated[Principal, Depends(require_scope("admin"))]
