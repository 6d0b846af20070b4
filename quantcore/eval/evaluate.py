"""`ptq4arvg eval`: the Inception metrics of a registered model or of an artifact, from scratch.

A model name is measured against the reference, with the noise floor of its own images under other
seeds. An artifact is measured against the reference and against its FP model (rebuilt from the
manifest: the bundled weights, or the recorded checkpoint if its sha256 still matches, with the
artifact's tokenizer), the FP model under other seeds giving every noise floor.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from quantcore import zoo
from quantcore.checkpoint import file_sha256
from quantcore.device import resolve_device
from quantcore.errors import ConfigError
from quantcore.eval.inception import InceptionFeatures
from quantcore.eval.quality import VS_FP, VS_REFERENCE, check_metrics, measure, sample_set
from quantcore.eval.reference import (
    FASHION_MNIST,
    FASHION_MNIST_IMAGES,
    Reference,
    ReferenceError,
    fashion_mnist_reference,
    load_reference,
)
from quantcore.generation import ImageGenerator

Progress = Callable[[str, float], None]


class FPUnavailableWarning(UserWarning):
    """An artifact's FP model cannot be rebuilt, so the *_vs_fp metrics and noise floors are skipped."""


def reproducible_fp_checkpoint(manifest: dict) -> tuple[bool, str | None]:
    """(whether the FP model can be rebuilt, its checkpoint path) from an artifact's manifest."""
    model = manifest["model"]
    checkpoint = model.get("checkpoint")
    if checkpoint is None:
        bundled = zoo.BUNDLED.get(model["name"])
        recorded = model.get("checkpoint_sha256")  # artifacts before provenance did not record it
        same = bundled is not None and recorded in (None, file_sha256(bundled.checkpoint))
        return same, None
    if not Path(checkpoint).is_file() or file_sha256(checkpoint) != model.get("checkpoint_sha256"):
        return False, checkpoint
    return True, checkpoint


def fp_generator(quantized: ImageGenerator, manifest: dict, device) -> ImageGenerator | None:
    """The artifact's FP model with the artifact's own tokenizer, or None (with a warning) if it cannot
    be rebuilt: random weights are not reproducible, a moved or changed checkpoint is not the same model."""
    from quantcore.models import bind_tokenizer
    from quantcore.registry import load_model

    ok, checkpoint = reproducible_fp_checkpoint(manifest)
    if not ok:
        if checkpoint:
            why = f"its checkpoint {checkpoint} is missing or no longer has the recorded sha256"
        elif manifest["model"]["name"] in zoo.BUNDLED:
            why = "the bundled weights are not the ones it was quantized from (sha256 differs)"
        else:
            why = "it was quantized from random weights"
        warnings.warn(
            f"FID vs FP skipped: the FP model cannot be rebuilt ({why})", FPUnavailableWarning, stacklevel=2
        )
        return None
    model = load_model(manifest["model"]["name"], checkpoint, device)
    bind_tokenizer(model, quantized.tokenizer)
    return ImageGenerator(
        model, quantized.tokenizer, quantized.defaults, manifest["model"]["name"], quantized.chunk_size
    )


def reference_source(reference: str | Path | None, model_name: str) -> str | Path | None:
    """What a run will measure against: a file (checked to exist, so a job fails before it calibrates),
    the built-in Fashion-MNIST test split (the bundled models' default), or None when there is none."""
    if reference is None:
        return FASHION_MNIST if model_name in zoo.BUNDLED else None
    if reference != FASHION_MNIST and not Path(reference).is_file():
        raise ReferenceError(f"reference {reference} not found", field=("evaluation", "reference"))
    return reference


def resolve_reference(
    reference: str | Path | None,
    model_name: str,
    features: InceptionFeatures,
    need_manifold: bool,
    reference_images: int = FASHION_MNIST_IMAGES,
    progress: Callable[[float], None] | None = None,
) -> Reference | None:
    """The loaded reference of `reference_source` (None when there is none)."""
    source = reference_source(reference, model_name)
    if source == FASHION_MNIST:
        return fashion_mnist_reference(features, reference_images, progress)
    if source is None:
        return None
    return load_reference(source, features, need_manifold, progress)


@torch.no_grad()  # not torch.set_grad_enabled(False): callers keep their grad mode
def evaluate(
    source: str,
    num_images: int,
    reference: str | Path | None = None,
    metrics: Sequence[str] | None = None,
    checkpoint: str | Path | None = None,
    tokenizer_checkpoint: str | Path | None = None,
    seed: int = 10_000,
    batch_size: int = 32,
    replicates: int = 50,
    noise_floor: bool = True,
    reference_images: int = FASHION_MNIST_IMAGES,
    real: bool = True,
    device: str | torch.device = "auto",
    progress: Progress | None = None,
) -> dict:
    """Generate `num_images` class-balanced images (image i: class i mod C, seed `seed` + i) and measure
    them; `metrics` None = every metric this source and reference allow."""
    from quantcore.api import load_generator

    report = progress or (lambda stage, fraction: None)
    device = resolve_device(device)
    started = time.perf_counter()
    generator = load_generator(source, checkpoint, tokenizer_checkpoint, device, real, batch_size)
    is_artifact = Path(source).is_dir()
    manifest = _manifest(source) if is_artifact else None
    model_name = manifest["model"]["name"] if is_artifact else source
    fp = fp_generator(generator, manifest, device) if is_artifact else None

    # what to measure, checked before any image is made
    source_ref = reference_source(reference, model_name)
    if metrics is None:
        requested = (list(VS_REFERENCE) if source_ref else []) + (list(VS_FP) if fp is not None else [])
    else:
        requested = list(metrics)
    if not requested:
        raise ConfigError(
            f"nothing to measure for {source}: give a reference (--ref REF.npz: an ADM reference batch, or "
            "one built by `ptq4arvg reference`)"
        )
    check_metrics(requested, num_images)
    if set(requested) & set(VS_REFERENCE) and source_ref is None:
        raise ConfigError(f"{source} has no default reference: give one (--ref REF.npz)")
    if set(requested) & set(VS_FP) and fp is None:
        raise ConfigError("fid_vs_fp / sfid_vs_fp need an artifact whose FP model can be rebuilt")
    features = InceptionFeatures(device)
    ref = None
    if set(requested) & set(VS_REFERENCE):
        need_manifold = bool({"precision", "recall"} & set(requested))
        ref = resolve_reference(
            reference, model_name, features, need_manifold, reference_images, lambda f: report("reference", f)
        )
        if ref.spatial is None and "sfid" in requested:
            if metrics is not None:
                raise ConfigError(f"reference {ref.name} has no sFID statistics (mu_s, sigma_s)")
            requested.remove("sfid")
    seconds = {"load_and_reference": round(time.perf_counter() - started, 3)}

    classes = generator.num_classes
    labels = [i % classes for i in range(num_images)]
    seeds = [seed + i for i in range(num_images)]
    other_seeds = [seed + num_images + i for i in range(num_images)]
    sets = {}
    plan = [("samples", generator, seeds)]
    if fp is not None:
        plan.append(("fp", fp, seeds))
    if noise_floor:
        plan.append(("fp_other_seeds", fp or generator, other_seeds))
    for name, gen, set_seeds in plan:
        t0 = time.perf_counter()
        sets[name] = sample_set(gen, labels, set_seeds, features, progress=lambda f, n=name: report(n, f))
        seconds[name] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    report("metrics", 0.0)
    result = measure(
        sets["samples"],
        requested,
        reference=ref,
        fp=sets.get("fp"),
        fp_other_seeds=sets.get("fp_other_seeds"),
        replicates=replicates,
    )
    seconds["metrics"] = round(time.perf_counter() - t0, 3)
    seconds["total"] = round(time.perf_counter() - started, 3)
    report("done", 1.0)
    return {
        "source": source,
        "kind": "artifact" if is_artifact else "model",
        "model": model_name,
        "seed": seed,
        "batch_size": batch_size,
        "sampling": generator.default_sampling,
        "reference": ref.describe() if ref is not None else None,
        "inception": features.describe(),
        "device": str(features.device),
        **result,
        "seconds": seconds,
    }


def _manifest(artifact: str) -> dict:
    from quantcore.artifact import verify_artifact

    return verify_artifact(artifact)
