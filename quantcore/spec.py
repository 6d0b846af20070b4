"""The job contract: what a quantization job asks for. One definition for the library, CLI and REST API.

pydantic and yaml only (no torch), so the API process can validate jobs without loading the engine.
The REST schema (app/schemas.py) extends these models with OpenAPI examples only: defaults and
limits live here and cannot drift between the surfaces.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from quantcore.errors import ConfigError
from quantcore.recipe import PRESETS, Recipe

SELECTIONS = ("dgc-official", "dgc-mahalanobis", "random", "uniform")
Selection = Literal[SELECTIONS]  # the tuple above, as a type
SEED_MAX = 2**32 - 1
# where jobs and generators run: auto = the first visible CUDA device, else the CPU
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"


RANGE_ERRORS = ("greater_than_equal", "less_than_equal", "greater_than", "less_than")


def field_range(model: type[BaseModel], loc: tuple) -> tuple | None:
    """(lowest, highest) a numeric field of `model` at `loc` accepts, from its ge/le constraints."""
    field = None
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return None
        annotation = field.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    limits = {name: getattr(m, name) for m in field.metadata for name in ("ge", "le") if hasattr(m, name)}
    return (limits["ge"], limits["le"]) if {"ge", "le"} <= limits.keys() else None


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CalibrationSpec(_Spec):
    num_samples: int = Field(
        64,
        ge=2,
        le=100_000,
        description="Images the FP model generates for the calibration pool (the pool holds 2x: cond "
        "and uncond halves); the selection keeps half of the pool.",
    )
    selection: Selection = Field(
        "dgc-official",
        description="How calibration samples are chosen: distribution-guided (DGC), random or uniform.",
    )
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of calibration generation and selection.")
    batch_size: int = Field(
        16,
        ge=1,
        le=4096,
        description="Images per generation batch and rows per calibration pass (GPU memory vs speed).",
    )


InceptionMetric = Literal["fid", "sfid", "precision", "recall", "fid_vs_fp", "sfid_vs_fp"]
INCEPTION_METRICS = InceptionMetric.__args__
VS_REFERENCE = INCEPTION_METRICS[:4]  # fid, sfid, precision, recall: measured against a reference
MANIFOLD_K = 3  # precision/recall: k-nearest-neighbour balls (ADM, Kynkäänniemi et al.)
FASHION_MNIST_REFERENCE = "fashion-mnist-test"  # the engine's own reference: the bundled models' default


def min_images(metrics) -> int:
    """Images a set needs: 2 for a covariance, k + 1 for the k-NN manifolds of precision/recall."""
    return MANIFOLD_K + 1 if {"precision", "recall"} & set(metrics) else 2


class EvaluationSpec(_Spec):
    num_images: int = Field(
        16,
        ge=0,
        le=50_000,
        description="Images sampled by the FP and the quantized model under the same classes and seeds "
        "(0 = no evaluation).",
    )
    seed: int = Field(
        10_000, ge=0, le=SEED_MAX, description="Seed of the first evaluation image; image i uses seed + i."
    )
    metrics: list[InceptionMetric] = Field(
        default_factory=list,
        description="Inception metrics of the quantized model's images (FID/sFID/precision/recall against "
        "the reference, FID/sFID against the FP model's images), each with a bootstrap 95% interval and "
        "the noise floor of the FP model under other seeds. Costs a third set of images and the Inception "
        "network per image.",
    )
    reference: str | None = Field(
        None,
        max_length=4096,
        description="What fid/sfid/precision/recall measure against: an ADM-format .npz (library, CLI: a "
        "path; REST: a registered reference's name or sha256). Bundled models default to the "
        "Fashion-MNIST test split.",
    )
    bootstrap: int = Field(50, ge=0, le=1000, description="Bootstrap replicates of each interval (0 = none).")

    def lacks_reference(self, bundled: bool) -> bool:
        """Metrics against a reference are asked for, with no reference given and no default (only the
        bundled models have one: the Fashion-MNIST test split)."""
        wanted = set(self.metrics) & set(VS_REFERENCE) and self.num_images > 0
        return bool(wanted) and self.reference is None and not bundled

    @model_validator(mode="after")
    def _enough_images(self) -> EvaluationSpec:
        need = min_images(self.metrics)
        if self.metrics and self.num_images < need:
            raise ValueError(
                f"num_images {self.num_images} is too few for {', '.join(self.metrics)}: {need} at least"
            )
        return self


class ExecutionSpec(_Spec):
    """How the artifact's layers run: recorded in the manifest, replayed by its loader on the same card."""

    objective: Literal["speed", "memory"] | None = Field(
        None,
        description="Plan the real kernels per layer for this objective on the worker's device: 'speed' "
        "times every candidate kernel (fp8, int8, weight-only w8/w4, the dequantized GEMM) at tune_rows "
        "input rows and keeps the fastest (CUDA workers only); 'memory' keeps the fewest weight bits. "
        "The choice and its timings go in the manifest; a loader on the same kind of card runs that "
        "choice without timing again. null: the default kernels, chosen at load.",
    )
    tune_rows: int = Field(
        2,
        ge=1,
        le=4096,
        description="Input rows the 'speed' objective times at: the serving shape (decode with CFG: 2 x "
        "batch).",
    )


class JobSpec(_Spec):
    """What to quantize and how."""

    model: str = Field(..., min_length=1, max_length=128, description="A registered model name.")
    checkpoint: str | None = Field(
        None,
        max_length=4096,
        description="Weights of the model: a file path (library, CLI) or, over REST, a registered "
        "checkpoint's name or sha256. Omit for the model's own (bundled or random) weights.",
    )
    tokenizer_checkpoint: str | None = Field(None, max_length=4096, description="Tokenizer weights file.")
    recipe: str | Recipe = Field(
        "ptq4arvg", description="A recipe preset name, or a full recipe (the schema of --recipe-file)."
    )
    w_bits: int = Field(8, ge=2, le=8, description="Weight bit-width (presets only).")
    a_bits: int | None = Field(8, ge=2, le=8, description="Activation bit-width; null = weight-only.")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec)

    @field_validator("recipe", mode="before")
    @classmethod
    def _preset_or_recipe(cls, value):
        """A preset name is checked here (so a typo is a field error), a recipe object by Recipe.parse."""
        if isinstance(value, str):
            if value not in PRESETS:
                raise ValueError(f"unknown preset {value!r}; presets are {', '.join(PRESETS)}")
            return value
        if isinstance(value, dict):  # validated here so that each error's loc is the recipe's own field
            return Recipe.model_validate(value)
        return value

    @classmethod
    def parse(cls, data: dict) -> JobSpec:
        """Validate a job spec; the first error becomes a ConfigError naming its field (and its range)."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            bounds = field_range(cls, first["loc"]) if first["type"] in RANGE_ERRORS else None
            allowed = f" (allowed: {bounds[0]} to {bounds[1]})" if bounds else ""
            message = f"{where}: {first['msg'].removeprefix('Value error, ')}{allowed}"
            raise ConfigError(message, field=tuple(first["loc"])) from None

    def resolved_recipe(self) -> Recipe:
        if isinstance(self.recipe, Recipe):
            return self.recipe
        return Recipe.preset(self.recipe, self.w_bits, self.a_bits)

    @property
    def recipe_name(self) -> str:
        return self.recipe if isinstance(self.recipe, str) else self.recipe.name
