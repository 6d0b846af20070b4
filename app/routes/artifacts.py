from __future__ import annotations

import hashlib
import json

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse, Response
from sqlalchemy.orm import Session

from app import redact, schemas
from app.db import jobs
from app.deps import SessionDep, SettingsDep
from app.security import JobsPrincipal, Principal
from app.storage import UnsafeName, artifact_file, check_file_name

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
        id=artifact.id,
        job_id=artifact.job_id,
        created_at=artifact.created_at,
        total_bytes=artifact.total_bytes,
        files=files,
        manifest=redact.scrub(artifact.manifest, hidden),
    )


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
