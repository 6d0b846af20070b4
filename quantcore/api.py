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

from quantcore.artifact import load_artifact, save_artifact
from quantcore.calib import build_calibration_set
from quantcore.calib.pool import check_cancel
from quantcore.checkpoint import file_sha256
from quantcore.errors import ArtifactError
from quantcore.eval.fidelity import teacher_forced_fidelity, token_agreement
from quantcore.fastgen import TokenSampler
from quantcore.generation import ImageGenerator
from quantcore.pipeline import quantize
from quantcore.quant.modules import iter_quant_modules
from quantcore.quant.real import plan_execution, to_real
from quantcore.registry import get_spec, load_model_and_tokenizer
from quantcore.spec import EvaluationSpec, JobSpec


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
def fidelity_metrics(
    fp,
    quantized,
    evaluation: EvaluationSpec,
    sampling: dict,
    batch_size: int,
    progress=None,
    should_cancel=None,
) -> dict:
    """Agreement of the quantized model with its FP model on the same classes and seeds.

    token_agreement: share of sampled tokens equal under the same seeds (CFG on);
    logit_kl / top1_agreement: teacher-forced on the FP model's own samples (held out from calibration).
    """
    n = evaluation.num_images
    if n == 0:
        return {}
    classes = [i % fp.config.num_classes for i in range(n)]
    seeds = [evaluation.seed + i for i in range(n)]
    tokens = {}
    for index, (name, model) in enumerate((("fp", fp), ("quantized", quantized))):
        sampler = TokenSampler(model, min(batch_size, n))
        total = 2 * sampler.progress_total(n)

        def step(produced: int, done=index * total // 2, total=total) -> None:
            check_cancel(should_cancel, "evaluation")
            if progress:
                progress("evaluate", (done + produced) / total)

        try:
            tokens[name] = sampler.generate_tokens(classes, seeds, step, **sampling)
        finally:
            sampler.close()
    fp_tokens, q_tokens = tokens["fp"], tokens["quantized"]
    classes = torch.tensor(classes, device=fp_tokens.device)
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
    metrics = fidelity_metrics(
        fp, quantized, job.evaluation, sampling, job.calibration.batch_size, report_progress, should_cancel
    )
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
