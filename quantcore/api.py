"""The engine's entry points for the CLI, the worker and notebooks.

quantize_job(spec, out_dir, progress, should_cancel) -> manifest   (what a job runs)
load_generator(source)                                -> ImageGenerator (model name or artifact)
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
from quantcore.generation import ImageGenerator
from quantcore.models import bind_tokenizer, family_module
from quantcore.pipeline import quantize
from quantcore.recipe import Recipe
from quantcore.registry import get_spec, load_model
from quantcore.tokenizers import load_tokenizer


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

    def resolved_recipe(self) -> Recipe:
        if isinstance(self.recipe, Recipe):
            return self.recipe
        return Recipe.preset(self.recipe, self.w_bits, self.a_bits)


def load_generator(
    source: str,
    checkpoint: str | Path | None = None,
    tokenizer_checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> ImageGenerator:
    """An image generator for a registered model name or an artifact folder."""
    if Path(source).is_dir():
        model, tokenizer, manifest = load_artifact(source, device)
        spec = get_spec(manifest["model"]["name"])
        return ImageGenerator(model, tokenizer, spec.entry.sampling, source)
    spec = get_spec(source)
    model = load_model(source, checkpoint, device)
    tokenizer = load_tokenizer(spec.config.tokenizer, tokenizer_checkpoint, device)
    bind_tokenizer(model, tokenizer)
    return ImageGenerator(model, tokenizer, spec.entry.sampling, source)


@torch.no_grad()
def fidelity_metrics(fp, quantized, evaluation: EvaluationSpec, sampling: dict) -> dict:
    """Agreement of the quantized model with its FP model on the same classes and seeds.

    token_agreement: share of sampled tokens equal under the same seeds (CFG on);
    logit_kl / top1_agreement: teacher-forced on the FP model's own samples (held out from calibration).
    """
    n = evaluation.num_images
    if n == 0:
        return {}
    cfg = fp.config
    generate_tokens = family_module(fp.family).generate_tokens
    device = next(fp.parameters()).device
    classes = torch.arange(n, device=device) % cfg.num_classes
    seeds = [evaluation.seed + i for i in range(n)]
    fp_tokens = generate_tokens(fp, classes, seeds, **sampling)
    q_tokens = generate_tokens(quantized, classes, seeds, **sampling)
    ref = fp.sequence_logits(classes, fp_tokens).log_softmax(-1)
    got = quantized.sequence_logits(classes, fp_tokens).log_softmax(-1)
    kl = (ref.exp() * (ref - got)).sum(-1).mean()
    return {
        "token_agreement": float((fp_tokens == q_tokens).float().mean()),
        "logit_kl": float(kl),
        "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
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
    try:
        job = spec if isinstance(spec, JobSpec) else JobSpec.model_validate(spec)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
    recipe = job.resolved_recipe()
    model_spec = get_spec(job.model)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ArtifactError(f"artifact folder {out_dir} is not empty; choose a new folder")
    started = time.perf_counter()
    report_progress = progress or (lambda stage, fraction: None)
    report_progress("load", 0.0)
    fp = load_model(job.model, job.checkpoint, device)
    tokenizer = load_tokenizer(model_spec.config.tokenizer, job.tokenizer_checkpoint, device)
    bind_tokenizer(fp, tokenizer)
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
    metrics = fidelity_metrics(fp, quantized, job.evaluation, sampling)
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
    }
    manifest = save_artifact(out_dir, quantized, tokenizer, manifest)
    report_progress("done", 1.0)
    return manifest
