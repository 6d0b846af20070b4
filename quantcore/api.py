"""The engine's entry points for the CLI, the worker and notebooks.

quantize_job(spec, out_dir, progress, should_cancel) -> manifest   (what a job runs)
load_generator(source, real=True)                     -> ImageGenerator (model name or artifact)
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from quantcore.artifact import load_artifact, save_artifact
from quantcore.calib import CalibrationSpec, build_calibration_set
from quantcore.calib.pool import check_cancel
from quantcore.checkpoint import file_sha256
from quantcore.errors import ArtifactError, ConfigError
from quantcore.eval.fidelity import teacher_forced_fidelity, token_agreement
from quantcore.generation import ImageGenerator
from quantcore.models import family_module
from quantcore.pipeline import quantize
from quantcore.quant.modules import iter_quant_modules
from quantcore.quant.real import plan_execution, to_real
from quantcore.recipe import Recipe
from quantcore.registry import get_spec, load_model_and_tokenizer


class EvaluationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_images: int = Field(
        8, ge=0, le=50_000, description="images sampled by FP and quantized models, same seeds"
    )
    seed: int = Field(10_000, ge=0)


class JobSpec(BaseModel):
    """What a quantization job asks for; the REST API and the CLI both validate into this."""

    model_config = ConfigDict(extra="forbid")

    model: str
    checkpoint: str | None = None
    tokenizer_checkpoint: str | None = None
    recipe: str | Recipe = "ptq4arvg"
    w_bits: int = Field(8, ge=2, le=8)
    a_bits: int | None = Field(8, ge=2, le=8)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)

    @classmethod
    def parse(cls, data: dict) -> JobSpec:
        """Validate a job spec; the first error becomes a ConfigError naming its field."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ConfigError(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None

    def resolved_recipe(self) -> Recipe:
        if isinstance(self.recipe, Recipe):
            return self.recipe
        return Recipe.preset(self.recipe, self.w_bits, self.a_bits)


def load_generator(
    source: str,
    checkpoint: str | Path | None = None,
    tokenizer_checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    real: bool = True,
) -> ImageGenerator:
    """An image generator for a registered model name or an artifact folder.

    An artifact runs its quantized layers on real low-bit kernels where the device supports them
    (`quantcore.quant.real.to_real`); `real=False` keeps every layer simulated. `generator.execution`
    records the path of each quantized layer.
    """
    if Path(source).is_dir():
        model, tokenizer, manifest = load_artifact(source, device)
        spec = get_spec(manifest["model"]["name"])
        if real:
            execution = to_real(model)
        else:
            execution = {
                n: {"path": "simulated", "reason": "real=False"} for n, _ in iter_quant_modules(model)
            }
        generator = ImageGenerator(model, tokenizer, spec.entry.sampling, source)
        generator.execution = execution
        return generator
    model, tokenizer = load_model_and_tokenizer(source, checkpoint, tokenizer_checkpoint, device)
    return ImageGenerator(model, tokenizer, get_spec(source).entry.sampling, source)


@torch.no_grad()
def fidelity_metrics(fp, quantized, evaluation: EvaluationSpec, sampling: dict, should_cancel=None) -> dict:
    """Agreement of the quantized model with its FP model on the same classes and seeds.

    token_agreement: share of sampled tokens equal under the same seeds (CFG on);
    logit_kl / top1_agreement: teacher-forced on the FP model's own samples (held out from calibration).
    """
    n = evaluation.num_images
    if n == 0:
        return {}
    generate_tokens = family_module(fp.family).generate_tokens
    device = next(fp.parameters()).device
    classes = torch.arange(n, device=device) % fp.config.num_classes
    seeds = [evaluation.seed + i for i in range(n)]
    step_check = lambda n: check_cancel(should_cancel, "evaluation")  # noqa: E731
    fp_tokens = generate_tokens(fp, classes, seeds, progress=step_check, **sampling)
    q_tokens = generate_tokens(quantized, classes, seeds, progress=step_check, **sampling)
    return {
        "token_agreement": token_agreement(fp_tokens, q_tokens),
        **teacher_forced_fidelity(fp, quantized, classes, fp_tokens),
        "num_images": n,
    }


Progress = Callable[[str, float], None]


def quantize_job(
    spec: dict | JobSpec,
    out_dir: str | Path,
    progress: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Calibrate, quantize, evaluate and write an artifact to `out_dir`; returns its manifest."""
    job = spec if isinstance(spec, JobSpec) else JobSpec.parse(spec)
    recipe = job.resolved_recipe()
    model_spec = get_spec(job.model)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ArtifactError(f"artifact folder {out_dir} is not empty; choose a new folder")
    started = time.perf_counter()
    report_progress = progress or (lambda stage, fraction: None)
    report_progress("load", 0.0)
    fp, tokenizer = load_model_and_tokenizer(job.model, job.checkpoint, job.tokenizer_checkpoint, device)
    sampling = model_spec.entry.sampling.to_dict()
    calibration = build_calibration_set(fp, job.calibration, sampling, report_progress, should_cancel)
    quantized = copy.deepcopy(fp)
    t0 = time.perf_counter()
    report = quantize(
        quantized, recipe, calibration, report_progress, should_cancel, job.calibration.batch_size
    )
    calibration_seconds = time.perf_counter() - t0
    check_cancel(should_cancel, "evaluation")
    report_progress("evaluate", 0.0)
    metrics = fidelity_metrics(fp, quantized, job.evaluation, sampling, should_cancel)
    metrics["calibration_seconds"] = round(calibration_seconds, 3)
    metrics["total_seconds"] = round(time.perf_counter() - started, 3)
    check_cancel(should_cancel, "artifact write")
    report_progress("write", 0.0)
    manifest = {
        "model": {
            "name": job.model,
            "family": model_spec.family,
            "config": model_spec.config.to_dict(),
            "tokenizer": model_spec.config.tokenizer,
            "checkpoint": job.checkpoint,
            "checkpoint_sha256": file_sha256(job.checkpoint) if job.checkpoint else None,
            "random_weights": job.checkpoint is None,
        },
        **report.to_dict(),
        "calibration": {**job.calibration.model_dump(), **calibration.record()},
        "evaluation": job.evaluation.model_dump(),
        "metrics": metrics,
        # per layer, the path a loader on this kind of device runs (the loader records its own)
        "execution": {"device": str(device), "layers": plan_execution(quantized, device)},
    }
    manifest = save_artifact(out_dir, quantized, tokenizer, manifest)
    report_progress("done", 1.0)
    return manifest
