"""POST /v1/generate. Async: a request waits for the device on a future, not in the thread pool."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from app import schemas, sources
from app.deps import SessionDep, SettingsDep
from app.generation import Refused, Source
from app.security import GeneratePrincipal, Principal
from app.services import field_error
from quantcore.errors import ArtifactError, CheckpointError, ConfigError, QuantcoreError
from quantcore.images import make_grid, png_bytes

router = APIRouter(prefix="/v1", tags=["generate"])


@router.post(
    "/generate",
    responses={
        200: {
            "model": schemas.GenerateResponse,
            "content": {"image/png": {}},
            "description": "A PNG grid (format=png) or one base64 PNG per image (format=json).",
        },
        **schemas.error_responses(401, 403, 404, 409, 413, 422, 503),
    },
)
async def generate(
    body: schemas.GenerateRequest,
    request: Request,
    db: SessionDep,
    settings: SettingsDep,
    principal: GeneratePrincipal,
) -> Response:
    """Generate class-conditional images from a model or a quantized artifact; same seed, same bytes.

    Every file is checked against the sha256 recorded in the database before it is loaded. A model
    without weights on this server is refused (422) unless the server allows random weights; a model
    larger than the server's generation memory, or a full queue, gets 503 saying why.
    """
    if len(body.classes) > settings.max_generate_images:
        raise field_error(("body", "classes"), f"at most {settings.max_generate_images} images per call")
    source = await run_in_threadpool(_resolve, db, settings, body, principal)
    seeds = body.image_seeds()
    try:
        images, used = await request.app.state.generators.generate(source, body.classes, seeds, body.sampling)
    except Refused as e:
        detail = e.detail if principal.is_admin else source.redact(e.detail)
        raise HTTPException(e.status, detail=detail, headers=e.headers) from e
    except ImportError as e:
        raise HTTPException(503, detail=f"the engine is not installed: {e}") from e
    except QuantcoreError as e:
        raise _engine_error(e, source, principal) from e
    content, media, headers = await run_in_threadpool(_render, body, source, seeds, images, used)
    return Response(content, media_type=media, headers=headers)


def _resolve(db, settings, body: schemas.GenerateRequest, principal: Principal) -> Source:
    try:
        source, base = sources.resolve(db, settings, body, principal)
        sources.check_request(body, base)
    finally:
        db.close()  # generation may take a while: do not hold a connection
    return source


def _engine_error(e: QuantcoreError, source: Source, principal: Principal) -> HTTPException:
    message = str(e) if principal.is_admin else source.redact(str(e))
    if isinstance(e, ArtifactError):
        return HTTPException(409, detail=f"artifact failed verification: {message}")
    if isinstance(e, CheckpointError):
        return field_error(("body", "model"), f"the checkpoint cannot be loaded: {message}")
    if isinstance(e, ConfigError) and e.field is not None:
        return field_error(("body", *e.field), message)
    return field_error(("body",), f"{type(e).__name__}: {message}")


def _render(
    body: schemas.GenerateRequest, source: Source, seeds: list[int], images: list[np.ndarray], used: dict
) -> tuple[bytes, str, dict[str, str]]:
    if body.response_format() == "json":
        response = schemas.GenerateResponse(
            source=source.label,
            width=images[0].shape[1],
            height=images[0].shape[0],
            sampling=used,
            images=[
                schemas.GeneratedImage(
                    class_label=c, seed=s, png_base64=base64.b64encode(png_bytes(im)).decode()
                )
                for c, s, im in zip(body.classes, seeds, images, strict=True)
            ],
        )
        return response.model_dump_json().encode(), "application/json", {}
    grid = images[0] if len(images) == 1 else make_grid(np.stack(images), ncol=min(8, len(images)))
    headers = {"X-Seeds": ",".join(map(str, seeds)), "X-Classes": ",".join(map(str, body.classes))}
    return png_bytes(grid), "image/png", headers
