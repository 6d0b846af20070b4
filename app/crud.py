"""Reads and writes of API keys, registered models and references (the API only; jobs live in app.db.jobs)."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.db.models import ApiKey, EvalReference, Model, utcnow

TOKEN_PREFIX = "ptq_"

# ---------------------------------------------------------------------------------------- api keys


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_api_key(
    session: Session, *, owner: str, scopes: Iterable[str], name: str | None = None
) -> tuple[ApiKey, str]:
    """Create a key; the plain token is returned once and only its sha256 is stored."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        prefix=token[:12],
        token_hash=hash_token(token),
        owner=owner,
        scopes=sorted(set(scopes)),
        name=name,
    )
    session.add(key)
    session.commit()
    return key, token


def get_api_key_by_token(session: Session, token: str) -> ApiKey | None:
    key = session.scalar(select(ApiKey).where(ApiKey.token_hash == hash_token(token)))
    if key is None or key.revoked_at is not None:
        return None
    return key


def touch_api_key(session: Session, key: ApiKey, *, min_interval_s: float = 60.0) -> None:
    now = utcnow()
    if key.last_used_at is None or (now - key.last_used_at).total_seconds() > min_interval_s:
        session.execute(update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=now))
        session.commit()


def revoke_api_key(session: Session, key_id: int) -> bool:
    result = session.execute(
        update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
    )
    session.commit()
    return result.rowcount == 1


def list_api_keys(session: Session, owner: str | None = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.id)
    if owner is not None:
        query = query.where(ApiKey.owner == owner)
    return list(session.scalars(query))


def count_api_keys(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(ApiKey)) or 0


# ------------------------------------------------------------------------------------------ models


def get_model(session: Session, name: str) -> Model | None:
    return session.scalar(select(Model).where(Model.name == name))


def list_models(session: Session) -> list[Model]:
    return list(session.scalars(select(Model).order_by(Model.source.desc(), Model.name)))


def upsert_registry_model(session: Session, entry: dict[str, Any]) -> Model:
    """Insert or refresh one entry of the engine's registry (``quantcore.registry.list_models()``)."""
    known = {"name", "family", "bundled", "parameters"}
    info = {k: v for k, v in entry.items() if k not in known}
    model = get_model(session, entry["name"])
    if model is None:
        model = Model(name=entry["name"], source="registry")
        session.add(model)
    elif model.source != "registry":
        raise ValueError(f"model name {entry['name']!r} is taken by a registered checkpoint")
    model.family = str(entry.get("family", "unknown"))
    model.bundled = bool(entry.get("bundled", False))
    model.parameters = int(entry["parameters"]) if entry.get("parameters") is not None else None
    model.info = info
    session.commit()
    return model


def register_checkpoint(
    session: Session,
    *,
    name: str,
    base: Model,
    path: str,
    sha256: str,
    size: int,
    registered_by: str,
    info: dict[str, Any] | None = None,
) -> Model:
    model = Model(
        name=name,
        family=base.family,
        source="checkpoint",
        base_model=base.name,
        bundled=False,
        parameters=base.parameters,
        checkpoint_path=path,
        checkpoint_sha256=sha256,
        checkpoint_size=size,
        info=info or {},
        registered_by=registered_by,
    )
    session.add(model)
    session.commit()
    return model


def find_checkpoint(session: Session, ref: str) -> Model | None:
    """A registered checkpoint by its model name or its sha256."""
    return session.scalar(
        select(Model).where(
            Model.source == "checkpoint", (Model.name == ref) | (Model.checkpoint_sha256 == ref)
        )
    )


# -------------------------------------------------------------------------------------- references


def list_references(session: Session) -> list[EvalReference]:
    return list(session.scalars(select(EvalReference).order_by(EvalReference.name)))


def find_reference(session: Session, ref: str) -> EvalReference | None:
    """A registered reference by its name or its sha256."""
    return session.scalar(
        select(EvalReference).where((EvalReference.name == ref) | (EvalReference.sha256 == ref))
    )


def register_reference(
    session: Session,
    *,
    name: str,
    path: str,
    sha256: str,
    size: int,
    info: dict[str, Any],
    registered_by: str,
) -> EvalReference:
    reference = EvalReference(
        name=name, path=path, sha256=sha256, size=size, info=info, registered_by=registered_by
    )
    session.add(reference)
    session.commit()
    return reference
