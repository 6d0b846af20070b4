"""The artifact folder under crashes: where attempts stage their output, how an artifact is published,
and the sweep that leaves nothing behind a killed worker.

An attempt writes into ``.staging/<job>.<attempt>`` (the engine makes its own temp folder
``.staging/.<job>.<attempt>.XXXX`` inside and renames it there). Publishing commits the artifact row
first, under an id derived from job and attempt, and then renames the folder into the root. So a kill
at any instant leaves either nothing referenced (the staging folder, removed by the next sweep) or a
committed artifact whose folder the next sweep finishes moving into place.

Deleting goes the other way: the folder is renamed into ``.trash/<artifact id>``, then the record is
deleted, then the folder removed. A kill in between leaves a ``.trash`` entry, which the next sweep
finishes (record and folder); nothing outside ``.staging`` and ``.trash`` is ever removed by a sweep.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

from sqlalchemy.orm import Session

from app.db import jobs, recovery

log = logging.getLogger(__name__)

STAGING = ".staging"
TRASH = ".trash"
_ARTIFACTS = uuid.UUID("5d6c1b1e-2f0a-4a8e-9a57-3f1d2c4b7a10")  # namespace of artifact ids


def artifact_id_for(job_id: str, attempt: int) -> str:
    """The id an attempt publishes its artifact under (the sweep recomputes it from the staging name)."""
    return str(uuid.uuid5(_ARTIFACTS, f"{job_id}/{attempt}"))


def staging_folder(root: Path, job_id: str, attempt: int) -> Path:
    return Path(root) / STAGING / f"{job_id}.{attempt}"


def clear_staging(root: Path, job_id: str) -> None:
    """Remove what earlier attempts of a job left in staging (theirs and the engine's temp folders)."""
    staging = Path(root) / STAGING
    for pattern in (f"{job_id}.*", f".{job_id}.*"):
        for leftover in staging.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def publish(staging: Path, root: Path, artifact_id: str) -> None:
    """Move a staged artifact into the root (one rename) and make the rename durable."""
    os.replace(staging, Path(root) / artifact_id)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _to_trash(root: Path, artifact_id: str, path: str) -> None:
    trash = Path(root) / TRASH
    trash.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(Path(root) / path, trash / artifact_id)
    except FileNotFoundError:
        pass  # never published, or already moved by a concurrent delete


def delete_artifact(session: Session, root: Path, artifact_id: str, path: str) -> bool:
    """Delete an ended job's artifact, record and files; False if its record was already gone."""
    _to_trash(root, artifact_id, path)
    deleted = jobs.delete_artifact_row(session, artifact_id)
    shutil.rmtree(Path(root) / TRASH / artifact_id, ignore_errors=True)
    return deleted


def delete_job(session: Session, root: Path, job_id: str) -> bool:
    """Delete an ended job with its events and its artifact (record and files); False if it was gone."""
    _, artifact = recovery.job_and_artifact(session, job_id)
    if artifact is not None:
        _to_trash(root, artifact.id, artifact.path)
    deleted = jobs.delete_job_row(session, job_id)
    if artifact is not None:
        shutil.rmtree(Path(root) / TRASH / artifact.id, ignore_errors=True)
    return deleted


def empty_trash(session: Session, root: Path) -> list[str]:
    """Finish the deletions a kill interrupted: delete the record (if left) and the folder."""
    trash = Path(root) / TRASH
    if not trash.is_dir():
        return []
    finished = []
    for entry in sorted(trash.iterdir()):
        jobs.delete_artifact_row(session, entry.name)
        shutil.rmtree(entry, ignore_errors=True)
        finished.append(entry.name)
    return finished


def _parse(name: str) -> tuple[str, int, bool] | None:
    """(job id, attempt, is the engine's temp folder) from a staging entry's name."""
    temp = name.startswith(".")
    parts = name.removeprefix(".").split(".")
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    try:
        uuid.UUID(parts[0])
    except ValueError:
        return None
    return parts[0], int(parts[1]), temp


def sweep(session: Session, root: Path) -> list[str]:
    """Finish or remove every staging entry whose attempt no longer runs; the entries it touched."""
    staging = Path(root) / STAGING
    if not staging.is_dir():
        return []
    touched = []
    for entry in sorted(staging.iterdir()):
        parsed = _parse(entry.name)
        if parsed is None:
            continue  # not ours
        job_id, attempt, temp = parsed
        job, artifact = recovery.job_and_artifact(session, job_id)
        session.rollback()  # end the read: the next entry sees fresh rows
        if job is not None and job.state == "running" and job.attempt == attempt:
            continue  # in progress
        published = artifact is not None and artifact.id == artifact_id_for(job_id, attempt)
        if published and not temp and not (Path(root) / artifact.id).exists():
            log.warning("finishing the publication of artifact %s of job %s", artifact.id, job_id)
            publish(entry, root, artifact.id)
        else:
            log.info(
                "removing staging entry %s (attempt %d of job %s no longer runs)", entry, attempt, job_id
            )
            shutil.rmtree(entry, ignore_errors=True)
        touched.append(entry.name)
    return touched
