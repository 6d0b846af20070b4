"""Request and response bodies of the REST API (pydantic v2), with the examples shown in OpenAPI."""

from __future__ import annotations

import datetime as dt
import urllib.parse
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from quantcore import spec as engine  # pydantic and yaml only: importing it keeps torch out of the API

SCOPES = ("jobs", "generate", "admin")

JobState = Literal["queued", "running", "succeeded", "failed", "canceled"]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -------------------------------------------------------------------------------------------- jobs


JOB_SPEC_EXAMPLE = {
    "model": "tiny-llamagen",
    "checkpoint": None,
    "recipe": "ptq4arvg",
    "w_bits": 8,
    "a_bits": 8,
    "calibration": {"num_samples": 64, "selection": "dgc-official", "seed": 0, "batch_size": 16},
    "evaluation": {"num_images": 16, "seed": 10_000},
}
JOB_SPEC_EXAMPLES = {
    "w8a8": {"summary": "PTQ4ARVG at W8A8 on a bundled model", "value": JOB_SPEC_EXAMPLE},
    "weight-only": {
        "summary": "RTN weight-only W4 on a bundled VAR",
        "value": {"model": "tiny-var", "recipe": "rtn", "w_bits": 4, "a_bits": None},
    },
    "custom-recipe": {
        "summary": "A full recipe (the schema of --recipe-file)",
        "value": {
            "model": "tiny-rar",
            "recipe": {
                "name": "sq-stwq-w6a6",
                "w_bits": 6,
                "a_bits": 6,
                "passes": [{"kind": "smoothquant", "alpha": 0.5}, {"kind": "stwq"}],
            },
        },
    },
}


WebhookEvent = Literal["start", "output", "logs", "completed"]
SERVICE_FIELDS = frozenset({"webhook", "webhook_events_filter"})  # the service's, not the engine's


class JobSpec(engine.JobSpec):
    """What to quantize and how: the engine's job spec (quantcore.spec), as the REST API takes it."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [JOB_SPEC_EXAMPLE]})

    webhook: str | None = Field(
        None,
        max_length=2048,
        description="An http(s) URL that gets a signed POST on the events of `webhook_events_filter` "
        "(README: Webhooks).",
        examples=["https://example.com/hooks/ptq4arvg"],
    )
    webhook_events_filter: list[WebhookEvent] | None = Field(
        None,
        min_length=1,
        description="Which events call the webhook: start, output (a new stage), logs (other state "
        "changes), completed. Default: all of them.",
    )

    @field_validator("webhook")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urllib.parse.urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("must be an http:// or https:// URL with a host")
        return value

    def engine_dict(self) -> dict[str, Any]:
        """The spec as the engine takes it (without the service's own fields)."""
        return self.model_dump(mode="json", exclude=set(SERVICE_FIELDS))

    @field_validator("tokenizer_checkpoint")
    @classmethod
    def _no_server_paths(cls, value: str | None) -> None:
        # a client naming files on the server could read any of them: checkpoints are registered first
        if value is not None:
            raise ValueError("not accepted over REST; the registered model brings its tokenizer")
        return value


class JobProgress(BaseModel):
    stage: str | None = Field(None, examples=["calibration-pool"])
    stage_percent: float = Field(..., ge=0, le=100, description="How far the current stage is.")
    percent: float = Field(..., ge=0, le=100, description="How far the whole job is.", examples=[42.5])
    eta_seconds: float | None = Field(None, description="Estimated seconds until the job ends.")
    heartbeat_at: dt.datetime | None = None


class JobError(BaseModel):
    kind: str = Field(
        ..., description="The error class (engine errors) or 'internal'.", examples=["ConfigError"]
    )
    message: str


class JobEventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    at: dt.datetime
    from_state: str | None
    to_state: str
    attempt: int
    worker: str | None
    message: str | None


class JobOut(BaseModel):
    id: str
    owner: str
    state: JobState
    spec: JobSpec
    progress: JobProgress
    cancel_requested: bool
    attempt: int
    worker: str | None
    device: dict[str, Any] | None = Field(
        None,
        description="Where the job runs or ran: device, GPU model, memory.",
        examples=[{"device": "cuda:0", "name": "NVIDIA H200"}],
    )
    error: JobError | None
    artifact_id: str | None
    metrics: dict[str, Any] | None = Field(
        ...,
        description="The manifest's metrics: fidelity to FP (token agreement, logit KL), timings and, when "
        "the spec's evaluation asks for them, `inception` (FID/sFID/precision/recall, FID vs FP: value, "
        "ci95, fp, noise_floor per metric).",
    )
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    events: list[JobEventOut] | None = Field(None, description="State changes (GET /v1/jobs/{id} only).")


class JobList(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


# --------------------------------------------------------------------------------------- artifacts


class ArtifactFile(BaseModel):
    name: str
    size: int
    sha256: str
    url: str


class ArtifactSummary(BaseModel):
    id: str
    job_id: str
    owner: str
    model: str = Field(..., description="The model its job named.")
    recipe: str = Field(..., description="The recipe its job ran (preset or recipe name).")
    w_bits: int
    a_bits: int | None
    created_at: dt.datetime
    total_bytes: int


class ArtifactOut(ArtifactSummary):
    files: list[ArtifactFile]
    manifest: dict[str, Any]


class ArtifactList(BaseModel):
    items: list[ArtifactSummary]
    total: int
    limit: int
    offset: int


# ---------------------------------------------------------------------------------------- webhooks


class WebhookSecret(BaseModel):
    key: str = Field(
        ...,
        description="Your signing secret (`whsec_` + base64 key): verify `webhook-signature` with it.",
        examples=["whsec_MfKQ9r8GKYqrTz2UTYZx4TvYlv1SdE3tcGiPcK2ZRm0="],
    )


# ------------------------------------------------------------------------------------------ models


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    family: str
    source: Literal["registry", "checkpoint"]
    base_model: str | None
    bundled: bool
    parameters: int | None
    checkpoint_sha256: str | None
    checkpoint_size: int | None
    info: dict[str, Any]
    created_at: dt.datetime


class ModelList(BaseModel):
    items: list[ModelOut]


class ModelRegister(_Strict):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "llamagen-b-finetuned",
                    "base_model": "llamagen-b",
                    "checkpoint_path": "/data/checkpoints/c2i_B_256_ft.pt",
                }
            ]
        },
    )

    name: str = Field(..., pattern=NAME_PATTERN, description="Name jobs will use for this checkpoint.")
    base_model: str = Field(..., min_length=1, max_length=128, description="Registry model it fits.")
    checkpoint_path: str = Field(
        ...,
        min_length=1,
        max_length=4096,
        description="Absolute path of the file, readable by server and workers.",
    )


# -------------------------------------------------------------------------------------- references


class ReferenceRegister(_Strict):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"name": "imagenet256", "path": "/data/refs/VIRTUAL_imagenet256_labeled.npz"}]
        },
    )

    name: str = Field(..., pattern=NAME_PATTERN, description="Name jobs give as `evaluation.reference`.")
    path: str = Field(
        ...,
        min_length=1,
        max_length=4096,
        description="Absolute path of an ADM-format .npz (arr_0 images and/or mu, sigma, mu_s, sigma_s), "
        "readable by server and workers; `ptq4arvg reference` builds one from a folder of images.",
    )


class ReferenceOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    sha256: str
    size: int
    info: dict[str, Any] = Field(..., description="What the file holds: its arrays and image count.")
    registered_by: str | None
    created_at: dt.datetime


class ReferenceList(BaseModel):
    items: list[ReferenceOut]
    builtin: list[str] = Field(
        ..., description="References the engine has itself (the bundled models' default when none is given)."
    )


# ---------------------------------------------------------------------------------------- generate

ClassLabel = Annotated[int, Field(ge=0, le=2**31 - 1)]
Seed = Annotated[int, Field(ge=0, le=2**31 - 1)]


class GenerateRequest(_Strict):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"artifact_id": "0b7f…", "classes": [1, 2, 3], "seed": 0, "format": "png"},
                {"model": "tiny-llamagen", "classes": [7], "seed": 3, "sampling": {"cfg_scale": 2.0}},
            ]
        },
    )

    model: str | None = Field(None, max_length=128, description="A model name (FP weights).")
    artifact_id: str | None = Field(None, max_length=36, description="A quantized artifact you own.")
    classes: list[ClassLabel] = Field(..., min_length=1, description="Class labels, one image each.")
    seed: Seed = Field(0, description="Seed of the first image; image i uses seed + i.")
    seeds: list[Seed] | None = Field(None, description="One seed per image (overrides `seed`).")
    sampling: dict[Annotated[str, StringConstraints(max_length=64)], bool | int | float | str] = Field(
        default_factory=dict,
        max_length=32,
        description="Sampling parameters of the model (GET /v1/models lists each model's `sampling` "
        "defaults): cfg_scale, temperature, top_k, top_p, ... Each value has the type of its default.",
    )
    format: Literal["png", "json"] | None = Field(
        None,
        description="png: one PNG (a grid when several images); json: one base64 PNG and seed per image. "
        "Default: png for one image, json for several.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> GenerateRequest:
        if self.seeds is None and self.seed + len(self.classes) - 1 > 2**31 - 1:
            raise ValueError("`seed` + number of images must stay below 2^31")
        if (self.model is None) == (self.artifact_id is None):
            raise ValueError("give exactly one of `model` and `artifact_id`")
        if self.seeds is not None and len(self.seeds) != len(self.classes):
            raise ValueError("`seeds` must have one entry per class label")
        return self

    def response_format(self) -> str:
        return self.format or ("png" if len(self.classes) == 1 else "json")

    def image_seeds(self) -> list[int]:
        return (
            list(self.seeds) if self.seeds is not None else [self.seed + i for i in range(len(self.classes))]
        )


class GeneratedImage(BaseModel):
    class_label: int
    seed: int
    png_base64: str


class GenerateResponse(BaseModel):
    source: str
    width: int
    height: int
    sampling: dict[str, Any]
    images: list[GeneratedImage]


# ------------------------------------------------------------------------------------------ health


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Check(BaseModel):
    ok: bool
    detail: str
    latency_ms: float


class Readiness(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, Check]


# ------------------------------------------------------------------------------------------ errors


class ErrorOut(BaseModel):
    """Every error: a message, or (422) a list of problems, each naming its field in `loc`."""

    detail: str | list[dict[str, Any]]


ERROR_DESCRIPTIONS = {
    400: "Malformed request (e.g. not a plain file name).",
    401: "Missing, invalid or revoked API key.",
    403: "The API key lacks the scope this route needs.",
    404: "No such resource (or not yours).",
    409: "Conflicts with the resource's state (already ended, changed on disk, name taken).",
    413: "Request body larger than the server accepts.",
    422: "Invalid input; `loc` names the field.",
    503: "A dependency (broker, device, memory) cannot take the request now; see Retry-After.",
}


def error_responses(*codes: int) -> dict[int, dict]:
    """OpenAPI entries of the error statuses a route can answer."""
    return {code: {"model": ErrorOut, "description": ERROR_DESCRIPTIONS[code]} for code in codes}
