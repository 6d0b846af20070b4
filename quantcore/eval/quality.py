"""The field's image-quality metrics of generated sets: FID, sFID, precision/recall against a reference,
FID/sFID against the FP model's samples, each with a bootstrap 95% interval and a noise floor.

    fid, sfid, precision, recall   the samples against the reference (ADM protocol, Inception pool_3 /
                                   mixed_6/conv[:7]); for a quantized model also the FP model's value
                                   under the same seeds ("fp")
    fid_vs_fp, sfid_vs_fp          the samples against the FP model's samples, same classes and seeds

noise_floor: the same metric for the FP model under other seeds (against the reference, or against its
own samples for *_vs_fp): what pure sampling noise reads at this image count. A difference between two
models smaller than the spread of their intervals, or a *_vs_fp below its noise floor, is noise.

Images stream through the generator and the network one chunk at a time; a set keeps its features
(pool 2048 + spatial 2023 float32, 16 KiB per image) for the manifolds and the bootstrap. No Inception
Score: the FID Inception file has no logits layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from quantcore.errors import ConfigError
from quantcore.eval.bootstrap import LEVEL, bootstrap_counts, interval
from quantcore.eval.frechet import Gaussian, frechet_distance
from quantcore.eval.inception import POOL_DIM, SPATIAL_DIM, InceptionFeatures
from quantcore.eval.manifold import K, knn_radii, precision_recall
from quantcore.eval.reference import Reference
from quantcore.generation import ImageGenerator
from quantcore.spec import INCEPTION_METRICS, VS_REFERENCE, min_images

METRICS = INCEPTION_METRICS
VS_FP = METRICS[4:]  # fid_vs_fp, sfid_vs_fp
BOOTSTRAP_REPLICATES = 50
FRACTION = (0.0, 1.0)  # the range of precision and recall
DISTANCE = (0.0, float("inf"))  # of FID and sFID
NO_INCEPTION_SCORE = "not offered: the FID Inception weights have no logits layer"
Progress = Callable[[float], None]


@dataclass
class SampleSet:
    """Features of images generated for `labels` under `seeds` (and their tokens when kept)."""

    labels: list[int]
    seeds: list[int]
    pool: torch.Tensor  # (N, 2048) float32
    spatial: torch.Tensor  # (N, 2023) float32
    tokens: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)


def sample_set(
    generator: ImageGenerator,
    labels: Sequence[int],
    seeds: Sequence[int],
    features: InceptionFeatures,
    keep_tokens: bool = False,
    progress: Progress | None = None,
) -> SampleSet:
    """Generate and measure chunk by chunk: at most one chunk of images exists at a time."""
    n = len(labels)
    pool = torch.empty(n, POOL_DIM, device=features.device)
    spatial = torch.empty(n, SPATIAL_DIM, device=features.device)
    tokens = []
    step = generator.chunk_size
    for start in range(0, n, step):
        chunk_tokens = generator.generate_tokens(labels[start : start + step], seeds[start : start + step])
        p, s = features(generator.decode(chunk_tokens))
        pool[start : start + len(p)], spatial[start : start + len(p)] = p, s
        if keep_tokens:
            tokens.append(chunk_tokens.cpu())
        if progress is not None:
            progress(min(start + step, n) / n)
    return SampleSet(list(labels), list(seeds), pool, spatial, torch.cat(tokens) if keep_tokens else None)


def check_metrics(metrics: Sequence[str], num_images: int) -> None:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    need = min_images(metrics)
    if metrics and num_images < need:
        what = f"precision/recall (k={K}) need {need}" if need > 2 else "a covariance needs 2"
        raise ConfigError(f"num_images: {num_images} is too few for {', '.join(metrics)}: {what} images")


class _Figures:
    """Computes one metric for a sample set, its interval (bootstrap counts) and the FP comparisons."""

    def __init__(self, replicates: int, seed: int, n: int, device):
        self.counts = bootstrap_counts(n, replicates, seed, device)
        self.replicates, self.seed = replicates, seed

    def entry(
        self, value: float, resampled: Callable[[torch.Tensor], float], counts=None, bounds=None, **extra
    ) -> dict:
        """{"value", "ci95" (when bootstrapping), and the `extra` figures given}; `counts` replaces the
        samples' draws (recall resamples the reference points)."""
        out = {"value": value}
        if self.replicates > 1:
            draws = self.counts if counts is None else counts
            out["ci95"] = interval(resampled, draws, value, bounds or DISTANCE)
        return {**out, **{k: v for k, v in extra.items() if v is not None}}


def _fid(samples: torch.Tensor, reference: Gaussian, weights: torch.Tensor | None = None) -> float:
    return frechet_distance(Gaussian.of(samples, weights), reference)


def _paired_fid(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    return frechet_distance(Gaussian.of(a, weights), Gaussian.of(b, weights))


def measure(
    samples: SampleSet,
    metrics: Sequence[str],
    reference: Reference | None = None,
    fp: SampleSet | None = None,
    fp_other_seeds: SampleSet | None = None,
    replicates: int = BOOTSTRAP_REPLICATES,
    bootstrap_seed: int = 0,
) -> dict:
    """The requested metrics of `samples`; vs-reference ones need `reference`, *_vs_fp ones `fp`.

    `fp` is the FP model's set under the same labels and seeds (None when `samples` is the FP model);
    `fp_other_seeds` the FP model under other seeds, for the noise floors.
    """
    check_metrics(metrics, len(samples))
    wanted = set(metrics)
    if wanted & set(VS_REFERENCE) and reference is None:
        raise ConfigError(f"{', '.join(sorted(wanted & set(VS_REFERENCE)))} need a reference")
    if wanted & set(VS_FP) and fp is None:
        raise ConfigError(f"{', '.join(sorted(wanted & set(VS_FP)))} need the FP model's samples")
    if "sfid" in wanted and reference.spatial is None:
        raise ConfigError(f"reference {reference.name} has no sFID statistics (mu_s, sigma_s)")
    device = samples.pool.device
    figures = _Figures(replicates, bootstrap_seed, len(samples), device)
    out: dict[str, dict] = {}
    for name, attr, ref_stats in (
        ("fid", "pool", reference.pool if reference else None),
        ("sfid", "spatial", reference.spatial if reference else None),
    ):
        if name not in wanted:
            continue
        ref_stats = ref_stats.to(device)
        feats = getattr(samples, attr)
        out[name] = figures.entry(
            _fid(feats, ref_stats),
            lambda w, feats=feats, ref=ref_stats: _fid(feats, ref, w),
            fp=_fid(getattr(fp, attr), ref_stats) if fp is not None else None,
            noise_floor=_fid(getattr(fp_other_seeds, attr), ref_stats)
            if fp_other_seeds is not None
            else None,
        )
    if wanted & {"precision", "recall"}:
        out.update(_precision_recall(samples, reference, fp, fp_other_seeds, figures, wanted))
    for name, attr in (("fid_vs_fp", "pool"), ("sfid_vs_fp", "spatial")):
        if name not in wanted:
            continue
        a, b = getattr(samples, attr), getattr(fp, attr)
        floor = _paired_fid(getattr(fp_other_seeds, attr), b) if fp_other_seeds is not None else None
        out[name] = figures.entry(
            _paired_fid(a, b), lambda w, a=a, b=b: _paired_fid(a, b, w), noise_floor=floor
        )
    return {
        "metrics": out,
        "num_images": len(samples),
        "bootstrap": {"replicates": replicates, "level": LEVEL, "seed": bootstrap_seed},
        "inception_score": NO_INCEPTION_SCORE,
    }


def _precision_recall(samples, reference, fp, fp_other_seeds, figures: _Figures, wanted) -> dict:
    """Intervals hold both k-NN manifolds fixed and resample the points tested against them: the
    samples for precision, the reference points for recall (a resampled set with duplicates would
    have zero-radius balls)."""
    ref_feats = reference.pool_features.to(samples.pool.device)
    radii = knn_radii(ref_feats)
    result = precision_recall(ref_feats, samples.pool, reference_radii=radii)
    others = {
        key: precision_recall(ref_feats, s.pool, reference_radii=radii)
        for key, s in (("fp", fp), ("noise_floor", fp_other_seeds))
        if s is not None
    }
    out = {}
    if "precision" in wanted:
        hits = result.samples_inside_reference.double()
        out["precision"] = figures.entry(
            result.precision,
            lambda w: float(w @ hits / w.sum()),
            bounds=FRACTION,
            **{k: r.precision for k, r in others.items()},
        )
    if "recall" in wanted:
        hits = result.reference_inside_samples.double()
        ref_counts = bootstrap_counts(len(hits), figures.replicates, figures.seed + 1, hits.device)
        out["recall"] = figures.entry(
            result.recall,
            lambda w: float(w @ hits / w.sum()),
            counts=ref_counts,
            bounds=FRACTION,
            **{k: r.recall for k, r in others.items()},
        )
    return out
