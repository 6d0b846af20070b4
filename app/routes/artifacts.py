from __future__ import annotations

import hashlib
import json
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.responses import FileResponse, Response
from sqlalchemy.orm import Session

from app import redact, schemas
from app.db import jobs
from app.db.models import TERMINAL_STATES
from app.deps import SessionDep, SettingsDep
from app.security import JobsPrincipal, Principal
from app.storage import UnsafeName, artifact_file, check_file_name
from worker import disk

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"], responses=schemas.error_responses(401, 403))

MANIFEST = "manifest.json"


def _get_visible_artifact(db: Session, artifact_id: str, principal: Principal):
    artifact = jobs.get_artifact(db, artifact_id, owner=principal.owner_filter)
    if artifact is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"artifact {artifact_id} not found")
    return artifact


def _redacted_manifest(artifact, hidden: dict[str, str]) -> bytes:
    """manifest.json as a key that may not see checkpoint paths and hashes downloads it."""
    return json.dumps(redact.scrub(artifact.manifest, hidden), indent=2).encode()


def _summary(artifact) -> dict:
    job = artifact.job
    return {
        "id": artifact.id,
        "job_id": artifact.job_id,
        "owner": artifact.owner,
        "model": job.model,
        "recipe": job.recipe,
        "w_bits": job.w_bits,
        "a_bits": job.a_bits,
        "created_at": artifact.created_at,
        "total_bytes": artifact.total_bytes,
    }


@router.get("", response_model=schemas.ArtifactList)
def list_artifacts(
    db: SessionDep,
    principal: JobsPrincipal,
    model: Annotated[str | None, Query(max_length=128, description="Only artifacts of this model.")] = None,
    recipe: Annotated[str | None, Query(max_length=128, description="Only artifacts of this recipe.")] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
    offset: Annotated[int, Query(ge=0, le=2**63 - 1, description="Artifacts to skip.")] = 0,
) -> schemas.ArtifactList:
    """Your artifacts (all artifacts for admins), newest first."""
    page, total = jobs.list_artifacts(
        db, owner=principal.owner_filter, model=model, recipe=recipe, limit=limit, offset=offset
    )
    items = [schemas.ArtifactSummary(**_summary(a)) for a in page]
    return schemas.ArtifactList(items=items, total=total, limit=limit, offset=offset)


@router.get("/{artifact_id}", response_model=schemas.ArtifactOut, responses=schemas.error_responses(404))
def get_artifact(
    artifact_id: str,
    db: SessionDep,
    principal: JobsPrincipal,
) -> schemas.ArtifactOut:
    """The artifact's manifest and its files (name, size, sha256, download URL)."""
    artifact = _get_visible_artifact(db, artifact_id, principal)
    hidden = redact.secrets_of(db, artifact.job, principal)
    files = []
    for f in artifact.files:
        if hidden and f["name"] == MANIFEST:
            content = _redacted_manifest(artifact, hidden)
            f = {**f, "size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
        files.append(schemas.ArtifactFile(**f, url=f"/v1/artifacts/{artifact.id}/files/{f['name']}"))
    return schemas.ArtifactOut(
        **_summary(artifact), files=files, manifest=redact.scrub(artifact.manifest, hidden)
    )


@router.delete(
    "/{artifact_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=schemas.error_responses(404, 409),
)
def delete_artifact(
    artifact_id: str, db: SessionDep, settings: SettingsDep, principal: JobsPrincipal
) -> Response:
    """Delete an artifact (record and files); its job's record stays. Refused (409) while its job has not
    ended."""
    artifact = _get_visible_artifact(db, artifact_id, principal)
    if artifact.job.state not in TERMINAL_STATES:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"artifact {artifact_id} belongs to job {artifact.job_id}, which is {artifact.job.state}: "
            "it can be deleted once the job has ended",
        )
    disk.delete_artifact(db, settings.artifact_dir, artifact.id, artifact.path)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{artifact_id}/files/{name}",
    response_class=FileResponse,
    responses=schemas.error_responses(400, 404),
)
def download_file(
    artifact_id: str,
    name: str,
    db: SessionDep,
    settings: SettingsDep,
    principal: JobsPrincipal,
) -> Response:
    try:
        check_file_name(name)
    except UnsafeName as e:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=str(e)) from e
    artifact = _get_visible_artifact(db, artifact_id, principal)
    entry = next((f for f in artifact.files if f["name"] == name), None)
    if entry is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"artifact {artifact_id} has no file '{name}'")
    hidden = redact.secrets_of(db, artifact.job, principal)
    if hidden and name == MANIFEST:
        content = _redacted_manifest(artifact, hidden)
        headers = {
            "X-Content-SHA256": hashlib.sha256(content).hexdigest(),
            "Content-Disposition": f'attachment; filename="{name}"',
        }
        return Response(content, media_type="application/json", headers=headers)
    try:
        path = artifact_file(settings.artifact_dir, artifact.path, name)
    except UnsafeName as e:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=str(e)) from e
    if not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"file '{name}' is missing from storage")
    media = "application/json" if name.endswith(".json") else "application/octet-stream"
    return FileResponse(path, media_type=media, filename=name, headers={"X-Content-SHA256": entry["sha256"]})
