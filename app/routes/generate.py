from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import Response

from app import crud, schemas
from app.db import jobs
from app.deps import SessionDep, SettingsDep
from app.security import GeneratePrincipal
from app.services import field_error
from quantcore.images import make_grid, png_bytes

router = APIRouter(prefix="/v1", tags=["generate"])


@router.post(
    "/generate",
    responses={
        200: {
            "content": {
                "image/png": {},
                "application/json": {"schema": schemas.GenerateResponse.model_json_schema()},
            },
            "description": "A PNG grid (format=png) or one base64 PNG per image (format=json).",
        },
        404: {"description": "No such model or artifact (or not yours)."},
    },
)
def generate(
    body: schemas.GenerateRequest,
    request: Request,
    db: SessionDep,
    settings: SettingsDep,
    principal: GeneratePrincipal,
) -> Response:
    """Generate class-conditional images from a model or a quantized artifact; same seed, same bytes."""
    if len(body.classes) > settings.max_generate_images:
        raise field_error(("body", "classes"), f"at most {settings.max_generate_images} images per call")
    if body.artifact_id is not None:
        artifact = jobs.get_artifact(db, body.artifact_id, owner=principal.owner_filter)
        if artifact is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"artifact {body.artifact_id} not found")
        source, checkpoint, label = str((settings.artifact_dir / artifact.path).resolve()), None, artifact.id
    else:
        model = crud.get_model(db, body.model)
        if model is None:
            raise field_error(("body", "model"), f"unknown model '{body.model}'; see GET /v1/models")
        source, checkpoint, label = model.name, None, model.name
        if model.source == "checkpoint":
            source, checkpoint = model.base_model, model.checkpoint_path
    db.close()  # generation may take a while: do not hold a connection

    seeds = body.image_seeds()
    try:
        images, used = request.app.state.generators.generate(
            source, checkpoint, body.classes, seeds, body.sampling
        )
    except ImportError as e:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, detail=f"the engine is not installed: {e}"
        ) from e
    except Exception as e:
        if _is_engine_user_error(e):
            kind = type(e).__name__
            if kind == "ArtifactError":
                raise HTTPException(
                    status.HTTP_409_CONFLICT, detail=f"artifact failed verification: {e}"
                ) from e
            raise field_error(("body", "sampling"), f"{kind}: {e}") from e
        raise

    if body.response_format() == "json":
        return Response(
            schemas.GenerateResponse(
                source=label,
                width=images[0].shape[1],
                height=images[0].shape[0],
                sampling=used,
                images=[
                    schemas.GeneratedImage(
                        class_label=c, seed=s, png_base64=base64.b64encode(png_bytes(im)).decode()
                    )
                    for c, s, im in zip(body.classes, seeds, images, strict=True)
                ],
            ).model_dump_json(),
            media_type="application/json",
        )
    return Response(
        png_bytes(images[0] if len(images) == 1 else make_grid(np.stack(images), ncol=min(8, len(images)))),
        media_type="image/png",
        headers={"X-Seeds": ",".join(map(str, seeds)), "X-Classes": ",".join(map(str, body.classes))},
    )


def _is_engine_user_error(e: Exception) -> bool:
    try:
        from quantcore.errors import QuantcoreError
    except ImportError:
        return False
    return isinstance(e, QuantcoreError)
