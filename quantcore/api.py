"""The engine's entry points for the CLI, the worker and notebooks.

quantize_job(spec, out_dir, progress, should_cancel) -> manifest   (what a job runs)
load_generator(source, real=True, objective=None)     -> ImageGenerator (model name or artifact)
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch

from quantcore import device as devices
from quantcore import zoo
from quantcore.artifact import load_artifact, save_artifact
from quantcore.calib import build_calibration_set
from quantcore.calib.pool import CalibrationSet, check_cancel
from quantcore.checkpoint import file_sha256
from quantcore.errors import ArtifactError, ConfigError
from quantcore.eval.fidelity import sampled_fidelity, teacher_forced
from quantcore.fastgen import TokenSampler
from quantcore.generation import ImageGenerator
from quantcore.pipeline import quantize
from quantcore.quant.modules import iter_quant_modules
from quantcore.quant.real import plan_execution, to_real
from quantcore.registry import get_spec, load_model_and_tokenizer, tokenizer_file
from quantcore.spec import EvaluationSpec, JobSpec


def load_generator(
    source: str,
    checkpoint: str | Path | None = None,
    tokenizer_checkpoint: str | Path | None = None,
    device: str | torch.device = "auto",
    real: bool = True,
    chunk_size: int = 8,
    objective: str | None = None,
) -> ImageGenerator:
    """An image generator for a registered model name or an artifact folder.

    An artifact runs its quantized layers on real low-bit kernels where the device supports them
    (`quantcore.quant.real.to_real`); `real=False` keeps every layer simulated. `objective` is
    to_real's: None (the default kernels), "speed" (each layer's fastest, timed; CUDA only) or
    "memory" (the fewest weight bits). An artifact whose job planned its execution (`execution.
    objective`) on the same kind of card runs that recorded plan when `objective` is None, untimed.
    `generator.execution` records the path of each quantized layer (with an objective, also the choice
    and its timings; `planned: recorded` where it came from the manifest). `device` as in `quantize_job`;
    `chunk_size`: images per generation batch.
    """
    device = devices.resolve_device(device)
    if Path(source).is_dir():
        # converted on the CPU for `device`, then moved: the device gets no float weight of a real layer
        model, tokenizer, manifest = load_artifact(source, "cpu" if real else device)
        spec = get_spec(manifest["model"]["name"])
        recorded = manifest.get("execution", {})
        if real and objective is None and recorded.get("objective") and _same_card(recorded, device):
            execution = to_real(model, device, recorded=recorded["layers"])  # the job's plan, untimed
        elif real:
            execution = to_real(model, device, objective=objective)
        else:
            execution = {
                n: {"path": "simulated", "reason": "real=False"} for n, _ in iter_quant_modules(model)
            }
        model, tokenizer = model.to(device), tokenizer.to(device)
        generator = ImageGenerator(model, tokenizer, spec.entry.sampling, source, chunk_size)
        generator.execution = execution
        return generator
    model, tokenizer = load_model_and_tokenizer(source, checkpoint, tokenizer_checkpoint, device)
    return ImageGenerator(model, tokenizer, get_spec(source).entry.sampling, source, chunk_size)


# calibration sequences the planned kernels are compared on against the simulated model
VS_SIMULATED_SEQUENCES = 16


def planned_execution(
    quantized: torch.nn.Module, job: JobSpec, device: torch.device, calibration: CalibrationSet
) -> dict:
    """The manifest's execution record: per layer the path a loader on this kind of device runs; with
    an objective, the planner's choice and its timings, made here on a copy of the model, and what those
    kernels change: `vs_simulated`, the teacher-forced measures of the real copy against the simulated
    model (KL(simulated || real), top-1 agreement; MAR: condition error) on calibration sequences."""
    objective = job.execution.objective
    if objective is None:
        return {"layers": plan_execution(quantized, device)}
    planned = copy.deepcopy(quantized)
    layers = to_real(planned, device, objective=objective, tune_rows=job.execution.tune_rows)
    n = min(VS_SIMULATED_SEQUENCES, len(calibration))
    against = teacher_forced(quantized, planned, calibration.classes[:n], calibration.tokens[:n])
    del planned
    return {
        "objective": objective,
        "tune_rows": job.execution.tune_rows,
        "layers": layers,
        "vs_simulated": {**{k: float(f"{v:.6g}") for k, v in against.items()}, "sequences": n},
    }


def _same_card(record: dict, device: torch.device) -> bool:
    here = devices.describe_device(device)
    return all(record.get(k) == here.get(k) for k in ("name", "capability", "torch"))


@torch.no_grad()
def fidelity_metrics(
    fp,
    quantized,
    evaluation: EvaluationSpec,
    sampling: dict,
    batch_size: int,
    progress=None,
    should_cancel=None,
    tokens: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Agreement of the quantized model with its FP model on the same classes and seeds.

    token_agreement: share of sampled tokens equal under the same seeds (CFG on);
    logit_kl / top1_agreement: teacher-forced on the FP model's own samples (held out from calibration).
    Continuous tokens (MAR): latent_rel_error, condition_rel_error and diffusion_loss (beside _fp) instead.
    `tokens` {"fp", "quantized"}: already sampled for these classes and seeds (by `inception_metrics`).
    """
    n = evaluation.num_images
    if n == 0:
        return {}
    classes = [i % fp.config.num_classes for i in range(n)]
    seeds = [evaluation.seed + i for i in range(n)]
    models = () if tokens is not None else (("fp", fp), ("quantized", quantized))
    tokens = dict(tokens or {})
    for index, (name, model) in enumerate(models):
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
    device = next(fp.parameters()).device
    fp_tokens, q_tokens = tokens["fp"].to(device), tokens["quantized"].to(device)
    classes = torch.tensor(classes, device=device)
    return {
        **sampled_fidelity(fp.family, fp_tokens, q_tokens),
        **teacher_forced(fp, quantized, classes, fp_tokens),
        "num_images": n,
    }


def check_reference(job: JobSpec) -> None:
    """Before any work: the metrics that need a reference have one (a file that exists, or a default)."""
    from quantcore.eval.evaluate import reference_source
    from quantcore.eval.quality import VS_REFERENCE

    if set(job.evaluation.metrics) & set(VS_REFERENCE) and job.evaluation.num_images:
        if reference_source(job.evaluation.reference, job.model) is None:
            raise ConfigError(
                f"evaluation.reference: {job.model} has no default reference; give one",
                field=("evaluation", "reference"),
            )


@torch.no_grad()
def inception_metrics(
    job: JobSpec,
    fp: ImageGenerator,
    quantized: ImageGenerator,
    device: torch.device,
    progress,
    should_cancel: Callable[[], bool] | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """The Inception metrics `job.evaluation` asks for, and the {"fp", "quantized"} tokens they sampled.

    Three sets of `num_images`: the quantized and the FP model under the evaluation seeds, and the FP
    model under the next seeds (the noise floors).
    """
    from quantcore.eval.evaluate import resolve_reference
    from quantcore.eval.inception import InceptionFeatures
    from quantcore.eval.quality import VS_REFERENCE, measure, sample_set

    evaluation = job.evaluation
    n = evaluation.num_images
    features = InceptionFeatures(device)
    reference = None
    if set(evaluation.metrics) & set(VS_REFERENCE):
        need_manifold = bool({"precision", "recall"} & set(evaluation.metrics))
        reference = resolve_reference(evaluation.reference, job.model, features, need_manifold)
    labels = [i % fp.num_classes for i in range(n)]
    seeds = [evaluation.seed + i for i in range(n)]
    plan = (
        ("quantized", quantized, seeds),
        ("fp", fp, seeds),
        ("fp_other_seeds", fp, [s + n for s in seeds]),
    )
    sets = {}
    for index, (name, generator, set_seeds) in enumerate(plan):

        def step(fraction: float, index=index) -> None:
            check_cancel(should_cancel, "evaluation")
            progress("evaluate", (index + fraction) / len(plan))

        keep = name != "fp_other_seeds"
        sets[name] = sample_set(generator, labels, set_seeds, features, keep_tokens=keep, progress=step)
    result = measure(
        sets["quantized"],
        evaluation.metrics,
        reference,
        sets["fp"],
        sets["fp_other_seeds"],
        replicates=evaluation.bootstrap,
    )
    result["reference"] = reference.describe() if reference is not None else None
    result["inception"] = features.describe()
    return result, {"fp": sets["fp"].tokens, "quantized": sets["quantized"].tokens}


# progress(stage, stage_fraction, overall_fraction): the job's stage, how far it is, how far the job is
Progress = Callable[[str, float, float], None]
PHASES = ("load", "calibration-pool", "quantize", "evaluate", "write")


def describe_device(device: str | torch.device = "auto") -> dict:
    """The device a job or generator given `device` runs on, and what it is (the GPU model)."""
    return devices.describe_device(devices.resolve_device(device))


class StageClock:
    """Seconds per phase and the job's overall fraction, from the engine's (stage, fraction) reports.

    The pipeline's stages (one per pass and the final calibration, with their per-layer folds) make up
    the `quantize` phase; the phases are weighted by their work (images sampled, sweeps over the
    calibration set), so the overall fraction, and an ETA from it, moves at a steady pace.
    """

    def __init__(self, job: JobSpec, recipe_passes: int, sink: Progress | None):
        n, k = job.calibration.num_samples, recipe_passes + 1
        sets = 3 if job.evaluation.metrics else 2  # Inception metrics add the FP model under other seeds
        work = {"calibration-pool": n, "quantize": 0.5 * n * k, "evaluate": sets * job.evaluation.num_images}
        fixed = 0.03 * sum(work.values())  # loading and writing: a small, fixed share
        weights = {"load": fixed, **work, "write": fixed}
        total = sum(weights.values())
        self.start, self.weight, acc = {}, {}, 0.0
        for phase in PHASES:
            self.start[phase], self.weight[phase] = acc / total, weights[phase] / total
            acc += weights[phase]
        self.sink, self.sub_stages, self.seen = sink, k, []
        self.phase, self.phase_started, self.seconds, self.overall = None, time.perf_counter(), {}, 0.0

    def _phase_of(self, stage: str) -> str:
        if stage in PHASES:
            return stage
        return "write" if stage == "done" else "quantize"

    def __call__(self, stage: str, fraction: float) -> None:
        phase = self._phase_of(stage)
        if phase != self.phase:
            now = time.perf_counter()
            if self.phase is not None:
                self.seconds[self.phase] = round(
                    self.seconds.get(self.phase, 0.0) + now - self.phase_started, 3
                )
            self.phase, self.phase_started = phase, now
        within = fraction
        if phase == "quantize":  # a pass's stages share its name before "-fold"
            base = stage.split("-fold")[0]
            if base not in self.seen:
                self.seen.append(base)
            within = min(1.0, (self.seen.index(base) + fraction) / self.sub_stages)
        self.overall = max(self.overall, self.start[phase] + self.weight[phase] * min(max(within, 0.0), 1.0))
        if self.sink is not None:
            self.sink(stage, fraction, 1.0 if stage == "done" else self.overall)


def weights_provenance(job: JobSpec) -> dict:
    """Where the FP weights came from (a checkpoint, the package's bundled file, or random init) and the
    sha256 of the weight and tokenizer files that were loaded, so an artifact names the model it was
    made from."""
    bundled = zoo.BUNDLED.get(job.model)
    weights = job.checkpoint or (bundled.checkpoint if bundled else None)
    tokenizer = job.tokenizer_checkpoint or (bundled.tokenizer_checkpoint if bundled else None)
    return {
        "weights": "checkpoint" if job.checkpoint else "bundled" if bundled else "random",
        "random_weights": weights is None,
        "checkpoint_sha256": file_sha256(weights) if weights else None,
        "tokenizer_sha256": file_sha256(tokenizer) if tokenizer else None,
    }


def quantize_job(
    spec: dict | JobSpec,
    out_dir: str | Path,
    progress: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
    device: str | torch.device = "auto",
) -> dict:
    """Calibrate, quantize, evaluate and write an artifact to `out_dir`; returns its manifest.

    `device`: auto (the first visible CUDA device, else the CPU) | cpu | cuda | cuda:N.
    """
    job = spec if isinstance(spec, JobSpec) else JobSpec.parse(spec)
    recipe = job.resolved_recipe()
    model_spec = get_spec(job.model)
    device = devices.resolve_device(device)
    if job.execution.objective == "speed" and device.type != "cuda":
        raise ConfigError(
            f"execution.objective 'speed' times the kernels on the worker's GPU, but this job runs on "
            f"{device}; use 'memory' or null, or run it on a CUDA worker",
            field=("execution", "objective"),
        )
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ArtifactError(f"artifact folder {out_dir} is not empty; choose a new folder")
    check_reference(job)
    started = time.perf_counter()
    report_progress = StageClock(job, len(recipe.passes), progress)
    report_progress("load", 0.0)
    fp, tokenizer = load_model_and_tokenizer(job.model, job.checkpoint, job.tokenizer_checkpoint, device)
    report_progress("load", 1.0)
    sampling = model_spec.entry.sampling.to_dict()
    report_progress("calibration-pool", 0.0)
    calibration = build_calibration_set(fp, job.calibration, sampling, report_progress, should_cancel)
    quantized = copy.deepcopy(fp)
    t0 = time.perf_counter()
    report = quantize(
        quantized, recipe, calibration, report_progress, should_cancel, job.calibration.batch_size
    )
    calibration_seconds = time.perf_counter() - t0
    check_cancel(should_cancel, "evaluation")
    report_progress("evaluate", 0.0)
    inception, tokens = None, None
    if job.evaluation.metrics and job.evaluation.num_images:
        batch = min(job.calibration.batch_size, job.evaluation.num_images)
        inception, tokens = inception_metrics(
            job,
            ImageGenerator(fp, tokenizer, model_spec.entry.sampling, job.model, batch),
            ImageGenerator(quantized, tokenizer, model_spec.entry.sampling, job.model, batch),
            device,
            report_progress,
            should_cancel,
        )
    metrics = fidelity_metrics(
        fp,
        quantized,
        job.evaluation,
        sampling,
        job.calibration.batch_size,
        report_progress,
        should_cancel,
        tokens,
    )
    if inception is not None:
        metrics["inception"] = inception
    metrics["calibration_seconds"] = round(calibration_seconds, 3)
    check_cancel(should_cancel, "artifact write")
    report_progress("write", 0.0)
    manifest = {
        "model": {
            "name": job.model,
            "family": model_spec.family,
            "config": model_spec.config.to_dict(),
            "tokenizer": model_spec.config.tokenizer,
            "checkpoint": job.checkpoint,
            **weights_provenance(job),
        },
        **report.to_dict(),
        "calibration": {**job.calibration.model_dump(), **calibration.record()},
        "evaluation": job.evaluation.model_dump(),
        "metrics": metrics,
        # seconds per phase up to the write (the job record adds the total)
        "timings": {**report_progress.seconds, "until_write": round(time.perf_counter() - started, 3)},
        # per layer, the path a loader on this kind of device runs (the loader records its own)
        "execution": {
            **devices.describe_device(device),
            **planned_execution(quantized, job, device, calibration),
        },
    }
    manifest = save_artifact(
        out_dir, quantized, tokenizer, manifest, tokenizer_file(job.model, job.tokenizer_checkpoint)
    )
    report_progress("done", 1.0)
    return manifest
