"""Request and response bodies of the REST API (pydantic v2), with the examples shown in OpenAPI."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from quantcore.recipe import PRESETS  # pydantic and yaml only: importing it keeps torch out of the API

RECIPES = tuple(PRESETS)
SELECTIONS = ("dgc-official", "dgc-mahalanobis", "random", "uniform")
SCOPES = ("jobs", "generate", "admin")

Recipe = Literal[RECIPES]
# Kept equal to quantcore.methods.selection.METHODS (a test checks it); that module imports torch.
Selection = Literal["dgc-official", "dgc-mahalanobis", "random", "uniform"]
JobState = Literal["queued", "running", "succeeded", "failed", "canceled"]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -------------------------------------------------------------------------------------------- jobs


class CalibrationSpec(_Strict):
    num_samples: int = Field(256, ge=2, le=100_000, description="Size of the calibration set.")
    selection: Selection = Field(
        "dgc-official",
        description="How calibration samples are chosen: distribution-guided (DGC), random or uniform.",
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of calibration generation and selection.")
    batch_size: int = Field(
        16,
        ge=1,
        le=4096,
        description="Images per generation batch and rows per calibration pass (GPU memory vs speed).",
    )


class EvaluationSpec(_Strict):
    num_images: int = Field(
        64, ge=0, le=50_000, description="Images generated to measure quality (0 = no evaluation)."
    )
    seed: int = Field(
        10_000, ge=0, le=2**32 - 1, description="Seed of the first evaluation image; image i uses seed + i."
    )


JOB_SPEC_EXAMPLE = {
    "model": "llamagen-fmnist-tiny",
    "checkpoint": None,
    "recipe": "ptq4arvg",
    "w_bits": 8,
    "a_bits": 8,
    "calibration": {"num_samples": 256, "selection": "dgc-official", "seed": 0, "batch_size": 16},
    "evaluation": {"num_images": 64, "seed": 10_000},
}


class JobSpec(_Strict):
    """What to quantize and how."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                JOB_SPEC_EXAMPLE,
                {"model": "var-fmnist-tiny", "recipe": "rtn", "w_bits": 4, "a_bits": None},
            ]
        },
    )

    model: str = Field(
        ...,
        min_length=1,
        max_length=128,
        description="A model name from GET /v1/models.",
        examples=["llamagen-fmnist-tiny"],
    )
    checkpoint: str | None = Field(
        None,
        max_length=128,
        description="A registered checkpoint (its model name or sha256) of the same base model; "
        "omit to use the model's own weights.",
    )
    recipe: Recipe = Field("ptq4arvg", description="Quantization recipe preset.")
    w_bits: int = Field(8, ge=2, le=8, description="Weight bit-width.")
    a_bits: int | None = Field(8, ge=2, le=8, description="Activation bit-width; null = weight-only.")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)


class JobProgress(BaseModel):
    stage: str | None = Field(None, examples=["calibration"])
    percent: float = Field(..., ge=0, le=100, examples=[42.5])
    eta_seconds: float | None = Field(None, description="Estimated seconds left in the current stage.")
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
    error: JobError | None
    artifact_id: str | None
    metrics: dict[str, Any] | None
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


class ArtifactOut(BaseModel):
    id: str
    job_id: str
    created_at: dt.datetime
    total_bytes: int
    files: list[ArtifactFile]
    manifest: dict[str, Any]


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


# ---------------------------------------------------------------------------------------- generate


class GenerateRequest(_Strict):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"artifact_id": "0b7f…", "classes": [1, 2, 3], "seed": 0, "format": "png"},
                {"model": "llamagen-fmnist-tiny", "classes": [7], "seed": 3, "sampling": {"cfg_scale": 2.0}},
            ]
        },
    )

    model: str | None = Field(None, max_length=128, description="A model name (FP weights).")
    artifact_id: str | None = Field(None, max_length=36, description="A quantized artifact you own.")
    classes: list[int] = Field(..., min_length=1, description="Class labels, one image each.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the first image; image i uses seed + i.")
    seeds: list[int] | None = Field(None, description="One seed per image (overrides `seed`).")
    sampling: dict[str, float | int | bool | str] = Field(
        default_factory=dict, description="Sampling parameters (cfg_scale, temperature, top_k, top_p, ...)."
    )
    format: Literal["png", "json"] | None = Field(
        None,
        description="png: one PNG (a grid when several images); json: one base64 PNG and seed per image. "
        "Default: png for one image, json for several.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> GenerateRequest:
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
