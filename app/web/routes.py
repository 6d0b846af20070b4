"""The dashboard's pages under /ui. Thin: each page authenticates the session's API key with the API's
own auth, checks the scope its REST route needs, and calls the REST route functions themselves (so
owner isolation, redaction and validation are the API's, byte for byte), then renders a template."""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import yaml
from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

from app import crud, schemas
from app.db import jobs
from app.db.models import JOB_STATES
from app.deps import CeleryDep, SessionDep, SettingsDep
from app.routes import artifacts as artifact_routes
from app.routes import generate as generate_routes
from app.routes import jobs as job_routes
from app.routes import models as model_routes
from app.security import Principal, authenticate, check_scope
from app.services import field_error
from app.web import session as web_session
from app.web import views
from app.web.session import CSRF_FIELD, WebSession
from quantcore.recipe import PRESETS
from quantcore.spec import FASHION_MNIST_REFERENCE, INCEPTION_METRICS, SELECTIONS

HERE = Path(__file__).resolve().parent
STATIC = {p.name: p for p in (HERE / "static").iterdir() if p.suffix in (".css", ".js")}
MEDIA = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
PAGE_SIZE = 25
GRID_CACHE_ENTRIES = 64  # PNGs of report grids, a few KiB each for the bundled models
MAX_LIVE_JOBS = 100
# everything a page loads is ours: no inline script, no other origin, no framing (clickjacking)
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; script-src 'self'; "
    "style-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}

templates = Jinja2Templates(directory=HERE / "templates")
templates.env.filters["num"] = lambda v, digits=4: (
    "-" if v is None else f"{v:.{digits}g}" if isinstance(v, float) else v
)
templates.env.filters["mib"] = lambda n: "-" if n is None else f"{n / 2**20:.2f} MiB"
templates.env.globals["bits_label"] = views.bits_label


def _render(
    request: Request, ws: WebSession, name: str, context: dict[str, Any], code: int = 200
) -> Response:
    response = templates.TemplateResponse(
        request,
        name,
        {"csrf_field": CSRF_FIELD, "csrf_token": ws.csrf_token, "signed_in": bool(ws.api_key), **context},
        status_code=code,
    )
    response.headers.update(PAGE_HEADERS)
    ws.write(request, response)
    return response


def _error_text(detail: Any) -> list[str]:
    """An HTTPException's detail as lines for people (422 lists name their field)."""
    if isinstance(detail, list):
        return [
            f"{'.'.join(str(p) for p in e.get('loc', []) if p not in ('body', 'query'))}: {str(e.get('msg')).removeprefix('Value error, ')}"
            for e in detail
        ]
    return [str(detail)]


class PageRoute(APIRoute):
    """A page answers its errors as an HTML page (status kept); redirects pass through."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def page_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except HTTPException as e:
                if 300 <= e.status_code < 400:
                    raise
                page = _error_page(request, e.status_code, _error_text(e.detail))
                page.headers.update(e.headers or {})  # e.g. Retry-After of a busy device
                return page
            except RequestValidationError as e:
                return _error_page(request, 422, _error_text(list(e.errors())))

        return page_handler


def _error_page(request: Request, code: int, lines: list[str]) -> Response:
    ws = web_session.load(request)
    return _render(request, ws, "error.html", {"code": code, "lines": lines, "principal": None}, code)


router = APIRouter(prefix="/ui", include_in_schema=False, route_class=PageRoute)
live = APIRouter(prefix="/live", include_in_schema=False)  # JSON for the pages' scripts


def get_web_session(request: Request) -> WebSession:
    return web_session.load(request)


WebSessionDep = Annotated[WebSession, Depends(get_web_session)]


def _login_redirect(request: Request) -> HTTPException:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return HTTPException(
        status.HTTP_303_SEE_OTHER, headers={"Location": "/ui/login?" + urlencode({"next": target})}
    )


def signed_in(request: Request, db, ws: WebSession, scope: str | None = None) -> Principal:
    """The session's principal (the API's auth and scopes); not logged in -> the login page."""
    principal = authenticate(db, ws.api_key) if ws.api_key else None
    if principal is None:
        raise _login_redirect(request)
    return check_scope(principal, scope) if scope else principal


async def _form(request: Request, ws: WebSession) -> dict[str, Any]:
    """The posted form, after its CSRF token is checked; repeated fields become lists."""
    form = await request.form()
    ws.check_csrf(form.get(CSRF_FIELD))
    values: dict[str, Any] = {}
    for key in form:
        items = form.getlist(key)
        values[key] = items if len(items) > 1 else items[0]
    return values


def _see_other(url: str, request: Request, ws: WebSession) -> Response:
    response = RedirectResponse(url, status.HTTP_303_SEE_OTHER)
    ws.write(request, response)
    return response


# -------------------------------------------------------------------------------- login, static


@router.get("")
def home() -> Response:
    return RedirectResponse("/ui/jobs", status.HTTP_303_SEE_OTHER)


def _safe_next(target: Any) -> str:
    # only our own pages: never an absolute or protocol-relative URL (an open redirect)
    if (
        isinstance(target, str)
        and target.startswith("/ui/")
        and not target.startswith("//")
        and "\\" not in target
    ):
        return target
    return "/ui/jobs"


@router.get("/login")
def login_page(request: Request, ws: WebSessionDep, next: str | None = None) -> Response:
    return _render(request, ws, "login.html", {"next": _safe_next(next), "error": None, "principal": None})


@router.post("/login")
async def login(request: Request, db: SessionDep, ws: WebSessionDep, settings: SettingsDep) -> Response:
    form = await _form(request, ws)
    key = str(form.get("api_key", "")).strip()
    principal = authenticate(db, key) if key else None
    if principal is None:
        context = {
            "next": _safe_next(form.get("next")),
            "principal": None,
            "error": "api_key: invalid or revoked API key" if key else "api_key: enter an API key",
        }
        return _render(request, ws, "login.html", context, status.HTTP_401_UNAUTHORIZED)
    ws.restart(key, web_session.lifetime_s(settings))
    return _see_other(_safe_next(form.get("next")), request, ws)


@router.post("/logout")
async def logout(request: Request, ws: WebSessionDep, settings: SettingsDep) -> Response:
    await _form(request, ws)
    ws.restart(None, web_session.lifetime_s(settings))
    return _see_other("/ui/login", request, ws)


@router.get("/static/{name}")
def static_file(name: str) -> Response:
    path = STATIC.get(name)
    if path is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no static file '{name}'")
    return FileResponse(path, media_type=MEDIA[path.suffix], headers={"Cache-Control": "no-cache"})


# ------------------------------------------------------------------------------------------ jobs


def _job_form_options(db, principal: Principal) -> dict[str, Any]:
    models = model_routes.list_models(db, principal).items
    return {
        "models": [m.name for m in models],
        "presets": list(PRESETS),
        "selections": SELECTIONS,
        "inception_metrics": INCEPTION_METRICS,
        "references": [FASHION_MNIST_REFERENCE, *(r.name for r in crud.list_references(db))],
    }


def _optional(value: Any) -> Any:
    return None if value in (None, "") else value


def job_spec_from_form(form: dict[str, Any]) -> dict[str, Any]:
    """The REST job body a submitted form describes; the REST schema validates it."""
    recipe_text = str(form.get("recipe_text", "")).strip()
    if recipe_text:
        try:
            recipe: Any = yaml.safe_load(recipe_text)
        except yaml.YAMLError as e:
            raise field_error(
                (
                    "body",
                    "recipe",
                ),
                f"not valid JSON/YAML: {e}",
            ) from e
        if not isinstance(recipe, dict):
            raise field_error(
                (
                    "body",
                    "recipe",
                ),
                "a recipe text must be a mapping (name, w_bits, a_bits, passes)",
            )
    else:
        recipe = form.get("recipe", "ptq4arvg")
    metrics = form.get("metrics", [])
    a_bits = form.get("a_bits", "")
    return {
        "model": form.get("model", ""),
        "recipe": recipe,
        "w_bits": _optional(form.get("w_bits")) or 8,
        "a_bits": None if a_bits in ("", "none") else a_bits,
        "calibration": {
            k: form[f"calibration_{k}"]
            for k in ("num_samples", "selection", "seed", "batch_size")
            if _optional(form.get(f"calibration_{k}")) is not None
        },
        "evaluation": {
            **{
                k: form[f"evaluation_{k}"]
                for k in ("num_images", "seed")
                if _optional(form.get(f"evaluation_{k}")) is not None
            },
            "metrics": metrics if isinstance(metrics, list) else [metrics],
            "reference": _optional(form.get("evaluation_reference")),
        },
    }


def _jobs_page(
    request: Request,
    db,
    ws: WebSession,
    principal: Principal,
    state: str | None,
    model: str | None,
    offset: int,
    form: dict[str, Any] | None = None,
    errors: list[str] | None = None,
    code: int = 200,
) -> Response:
    if state is not None and state not in JOB_STATES:
        raise field_error(("query", "state"), f"unknown state '{state}'; one of {', '.join(JOB_STATES)}")
    page = job_routes.list_jobs(db, principal, state=state, model=model, limit=PAGE_SIZE, offset=offset)
    context = {
        "principal": principal,
        "page": page,
        "state": state,
        "model": model,
        "states": JOB_STATES,
        "form": form or {},
        "errors": errors or [],
        **_job_form_options(db, principal),
        "next_offset": offset + PAGE_SIZE if offset + PAGE_SIZE < page.total else None,
        "prev_offset": max(0, offset - PAGE_SIZE) if offset else None,
    }
    return _render(request, ws, "jobs.html", context, code)


@router.get("/jobs")
def jobs_page(
    request: Request,
    db: SessionDep,
    ws: WebSessionDep,
    state: Annotated[str | None, Query(max_length=16)] = None,
    model: Annotated[str | None, Query(max_length=128)] = None,
    offset: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
) -> Response:
    principal = signed_in(request, db, ws, "jobs")
    return _jobs_page(request, db, ws, principal, _optional(state), _optional(model), offset)


@router.post("/jobs")
async def submit_job(
    request: Request, db: SessionDep, ws: WebSessionDep, celery: CeleryDep, settings: SettingsDep
) -> Response:
    form = await _form(request, ws)
    principal = signed_in(request, db, ws, "jobs")
    try:
        spec = schemas.JobSpec.model_validate(job_spec_from_form(form))
        job = job_routes.create_job(Response(), spec, db, celery, settings, principal)
    except ValidationError as e:
        return _jobs_page(request, db, ws, principal, None, None, 0, form, _error_text(e.errors()), 422)
    except HTTPException as e:
        if e.status_code != 422:
            raise
        return _jobs_page(request, db, ws, principal, None, None, 0, form, _error_text(e.detail), 422)
    return _see_other(f"/ui/jobs/{job.id}", request, ws)


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(
    job_id: str, request: Request, db: SessionDep, ws: WebSessionDep, settings: SettingsDep
) -> Response:
    await _form(request, ws)
    principal = signed_in(request, db, ws, "jobs")
    job_routes.cancel_job(job_id, db, settings, principal)
    return _see_other(f"/ui/jobs/{job_id}", request, ws)


def _succeeded_of_model(db, principal: Principal, model: str) -> list[schemas.JobOut]:
    return job_routes.list_jobs(db, principal, state="succeeded", model=model, limit=100, offset=0).items


@router.get("/jobs/{job_id}")
def job_report(job_id: str, request: Request, db: SessionDep, ws: WebSessionDep) -> Response:
    principal = signed_in(request, db, ws, "jobs")
    job = job_routes.get_job(job_id, db, principal)
    artifact = artifact_routes.get_artifact(job.artifact_id, db, principal) if job.artifact_id else None
    manifest = artifact.manifest if artifact else {}
    context = {
        "principal": principal,
        "job": job,
        "artifact": artifact,
        "metric_rows": views.metric_rows(job.metrics),
        "layer_rows": views.layer_rows(manifest),
        "stage_rows": views.stage_rows(manifest, job.metrics),
        "calibration": views.calibration_summary(manifest),
        "execution": views.execution_summary(manifest),
        "grids": views.report_grids(job, manifest),
        "layer_plots": views.per_layer_plots(manifest),
        "bits_plots": views.metric_vs_bits_plots(_succeeded_of_model(db, principal, job.spec.model)),
        "can_generate": principal.holds("generate"),
        "spec_json": json.dumps(job.spec.model_dump(mode="json"), indent=2),
    }
    return _render(request, ws, "job.html", context)


@live.get("/jobs")
def live_jobs(
    request: Request, db: SessionDep, id: Annotated[list[str], Query(max_length=MAX_LIVE_JOBS)] = ()
) -> JSONResponse:
    """State, stage, progress and ETA of the listed jobs (those visible to the session's key)."""
    ws = web_session.load(request)
    principal = authenticate(db, ws.api_key) if ws.api_key else None
    if principal is None:
        return JSONResponse({"detail": "not logged in"}, status.HTTP_401_UNAUTHORIZED)
    check_scope(principal, "jobs")
    out = []
    for job_id in id:
        try:
            job = job_routes.get_job(job_id, db, principal)
        except HTTPException:
            continue  # not visible to this key: left out, as if it did not exist
        out.append(
            {
                "id": job.id,
                "state": job.state,
                "stage": job.progress.stage,
                "percent": job.progress.percent,
                "eta_seconds": job.progress.eta_seconds,
                "artifact_id": job.artifact_id,
                "error": job.error.message if job.error else None,
            }
        )
    return JSONResponse({"jobs": out}, headers={"Cache-Control": "no-store"})


# ------------------------------------------------------------------------------------- artifacts


def _artifact_rows(db, principal: Principal, model: str | None) -> list[views.ArtifactRow]:
    rows, _ = jobs.list_artifacts(db, owner=principal.owner_filter, model=model, limit=100)
    return [
        views.ArtifactRow(
            artifact_routes.get_artifact(a.id, db, principal), job_routes.get_job(a.job_id, db, principal)
        )
        for a in rows
    ]


@router.get("/artifacts")
def artifacts_page(
    request: Request,
    db: SessionDep,
    ws: WebSessionDep,
    model: Annotated[str | None, Query(max_length=128)] = None,
) -> Response:
    principal = signed_in(request, db, ws, "jobs")
    context = {
        "principal": principal,
        "artifacts": _artifact_rows(db, principal, _optional(model)),
        "model": _optional(model),
    }
    return _render(request, ws, "artifacts.html", context)


@router.get("/artifacts/{artifact_id}/files/{name}")
def artifact_file(
    artifact_id: str, name: str, request: Request, db: SessionDep, ws: WebSessionDep, settings: SettingsDep
) -> Response:
    principal = signed_in(request, db, ws, "jobs")
    return artifact_routes.download_file(artifact_id, name, db, settings, principal)


@router.get("/compare")
def compare_page(
    request: Request,
    db: SessionDep,
    ws: WebSessionDep,
    artifact: Annotated[list[str], Query(max_length=12)] = (),
) -> Response:
    principal = signed_in(request, db, ws, "jobs")
    chosen = []
    for artifact_id in dict.fromkeys(artifact):
        found = artifact_routes.get_artifact(artifact_id, db, principal)
        chosen.append(views.ArtifactRow(found, job_routes.get_job(found.job_id, db, principal)))
    models = {row.job.spec.model for row in chosen}
    if len(models) > 1:
        raise field_error(
            ("query", "artifact"), f"compare artifacts of one model; these are of {', '.join(sorted(models))}"
        )
    rows = [
        {
            "row": row,
            "metrics": views.flat_metrics(row.job.metrics),
            "grids": views.report_grids(row.job, row.artifact.manifest),
        }
        for row in chosen
    ]
    columns = [k for k in (*views.INCEPTION, *views.FIDELITY) if any(k in r["metrics"] for r in rows)]
    labels = {**views.INCEPTION, **{k: v[0] for k, v in views.FIDELITY.items()}}
    context = {
        "principal": principal,
        "rows": rows,
        "columns": columns,
        "labels": labels,
        "choices": _artifact_rows(db, principal, None) if len(chosen) < 2 else [],
        "can_generate": principal.holds("generate"),
    }
    return _render(request, ws, "compare.html", context)


# ---------------------------------------------------------------------------------------- generate


def _class_names(db, model_name: str | None) -> list[str] | None:
    model = crud.get_model(db, model_name or "")
    if model is not None and model.source == "checkpoint":
        model = crud.get_model(db, model.base_model or "")
    return (model.info or {}).get("class_names") if model is not None else None


def _sources(db, principal: Principal) -> dict[str, Any]:
    models = [
        m for m in model_routes.list_models(db, principal).items if m.bundled or m.source == "checkpoint"
    ]
    artifacts, _ = jobs.list_artifacts(db, owner=principal.owner_filter, limit=100)
    return {
        "models": models,
        "artifacts": [
            (
                a.id,
                f"{a.job.model} · {a.job.recipe} {views.bits_label(a.job.w_bits, a.job.a_bits)} · {a.id[:8]}",
            )
            for a in artifacts
        ],
        "class_names": {m.name: _class_names(db, m.name) for m in models},
    }


def _parse_source(source: str) -> tuple[str, str]:
    kind, _, name = source.partition(":")
    if kind not in ("model", "artifact") or not name:
        raise field_error(
            (
                "body",
                "source",
            ),
            "choose a model (model:NAME) or an artifact (artifact:ID)",
        )
    return kind, name


def _labels(text: str, field: str) -> list[int]:
    try:
        return [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError as e:
        raise field_error(
            (
                "body",
                field,
            ),
            "class labels are whole numbers separated by commas, like 0,3,7",
        ) from e


def _source_model(db, principal: Principal, kind: str, name: str) -> str | None:
    if kind == "model":
        return name
    artifact = jobs.get_artifact(db, name, owner=principal.owner_filter)
    return artifact.job.spec.get("model") if artifact is not None else None


def generate_request_from_form(form: dict[str, Any]) -> dict[str, Any]:
    """The REST generate body a submitted form describes."""
    kind, name = _parse_source(str(form.get("source", "")))
    picked = form.get("class_names", [])
    picked = picked if isinstance(picked, list) else [picked]
    classes = [
        *_labels(",".join(map(str, picked)), "class_names"),
        *_labels(str(form.get("classes", "")), "classes"),
    ]
    sampling = {
        k: form[k] for k in ("cfg_scale", "temperature", "top_p") if _optional(form.get(k)) is not None
    }
    if _optional(form.get("top_k")) is not None:
        sampling["top_k"] = form["top_k"]
    body = {
        ("model" if kind == "model" else "artifact_id"): name,
        "classes": classes,
        "seed": _optional(form.get("seed")) or 0,
        "sampling": sampling,
        "format": "json",
    }
    return body


def _typed_sampling(body: dict[str, Any]) -> dict[str, Any]:
    # form values are text: numbers as the engine's defaults type them (top_k an int, the rest floats)
    out = {}
    for key, value in body["sampling"].items():
        try:
            out[key] = int(value) if key == "top_k" else float(value)
        except ValueError as e:
            raise field_error(
                ("body", "sampling", key), "must be a whole number" if key == "top_k" else "must be a number"
            ) from e
    return {**body, "sampling": out}


@router.get("/generate")
def generate_page(request: Request, db: SessionDep, ws: WebSessionDep, source: str | None = None) -> Response:
    principal = signed_in(request, db, ws, "generate")
    context = {
        "principal": principal,
        **_sources(db, principal),
        "form": {"source": source or ""},
        "errors": [],
        "result": None,
    }
    return _render(request, ws, "generate.html", context)


@router.post("/generate")
async def generate(request: Request, db: SessionDep, ws: WebSessionDep, settings: SettingsDep) -> Response:
    form = await _form(request, ws)
    principal = signed_in(request, db, ws, "generate")
    options = _sources(db, principal)
    try:
        raw = generate_request_from_form(form)
        kind, name = _parse_source(str(form.get("source", "")))
        body = schemas.GenerateRequest.model_validate(_typed_sampling(raw))
        response = await generate_routes.generate(body, request, db, settings, principal)
    except ValidationError as e:
        errors = _error_text(e.errors())
    except HTTPException as e:
        if e.status_code not in (404, 409, 422):
            raise
        errors = _error_text(e.detail)
    else:
        result = json.loads(response.body)
        names = _class_names(db, _source_model(db, principal, kind, name)) or []
        for image in result["images"]:
            label = image["class_label"]
            image["class_name"] = names[label] if label < len(names) else None
        context = {"principal": principal, **options, "form": form, "errors": [], "result": result}
        return _render(request, ws, "generate.html", context)
    context = {"principal": principal, **options, "form": form, "errors": errors, "result": None}
    return _render(request, ws, "generate.html", context, 422)


def _grid_cache(request: Request) -> collections.OrderedDict:
    state = request.app.state
    if not hasattr(state, "dashboard_grids"):
        state.dashboard_grids = collections.OrderedDict()
    return state.dashboard_grids


@router.get("/grid.png")
async def grid_png(
    request: Request,
    db: SessionDep,
    ws: WebSessionDep,
    settings: SettingsDep,
    source: Annotated[str, Query(max_length=200)],
    classes: Annotated[str, Query(max_length=400)],
    seed: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> Response:
    """A grid of one source's images (the report's FP and quantized grids): through the generate route,
    kept in a small LRU because the same source, classes and seeds always give the same bytes."""
    principal = signed_in(request, db, ws, "generate")
    kind, name = _parse_source(source)
    body = schemas.GenerateRequest.model_validate(
        {
            ("model" if kind == "model" else "artifact_id"): name,
            "classes": _labels(classes, "classes"),
            "seed": seed,
            "format": "png",
        }
    )
    if kind == "artifact" and jobs.get_artifact(db, name, owner=principal.owner_filter) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"artifact {name} not found")
    cache, key = _grid_cache(request), (source, tuple(body.classes), seed)
    png = cache.get(key)
    if png is None:
        response = await generate_routes.generate(body, request, db, settings, principal)
        png = cache[key] = response.body
        while len(cache) > GRID_CACHE_ENTRIES:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})


# ------------------------------------------------------------------------------------------ models


@router.get("/models")
def models_page(request: Request, db: SessionDep, ws: WebSessionDep) -> Response:
    principal = signed_in(request, db, ws)
    context = {"principal": principal, "models": model_routes.list_models(db, principal).items}
    return _render(request, ws, "models.html", context)


router.include_router(live)
