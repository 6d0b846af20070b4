"""Registered checkpoints' server paths and hashes are for admin keys only: what a job or an artifact
made from one shows to other keys names the checkpoint by its registered name instead."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app import crud, schemas
from app.db.models import Job
from app.security import Principal


def secrets_of(db: Session, job: Job, principal: Principal) -> dict[str, str]:
    """What to hide from this caller in the records of ``job`` -> what to show instead."""
    sha = job.checkpoint_sha256
    if principal.is_admin or not sha:
        return {}
    model = crud.find_checkpoint(db, sha)
    label = f"<registered checkpoint '{model.name}'>" if model else "<a registered checkpoint>"
    hidden = {sha: label, sha[:12]: label}  # worker messages quote 12-digit prefixes
    path = (job.engine_spec or {}).get("checkpoint")
    if path:
        hidden[path] = label
    return hidden


def scrub(value: Any, hidden: dict[str, str]) -> Any:
    """``value`` (JSON-like) with every hidden string replaced, inside strings too."""
    if not hidden:
        return value
    if isinstance(value, str):
        for secret in sorted(hidden, key=len, reverse=True):
            value = value.replace(secret, hidden[secret])
        return value
    if isinstance(value, dict):
        return {k: scrub(v, hidden) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v, hidden) for v in value]
    return value


def job(out: schemas.JobOut, hidden: dict[str, str]) -> schemas.JobOut:
    """The job as this caller may see it (its spec is the caller's own words, shown as given)."""
    if not hidden:
        return out
    return schemas.JobOut.model_validate(
        {**scrub(out.model_dump(exclude={"spec"}), hidden), "spec": out.spec}
    )
