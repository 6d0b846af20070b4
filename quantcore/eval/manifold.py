"""Improved precision and recall (Kynkäänniemi et al. 2019), k = 3, as the ADM evaluator computes them.

Each set's manifold is the union of balls around its points, the radius of a ball being the distance to
that point's k-th nearest neighbour in its own set. Precision: the share of samples inside the
reference manifold; recall: the share of reference points inside the samples' manifold.

Squared Euclidean distances in float32 blocks of `BLOCK` rows (the ADM evaluator computes them in
float16 and compares `distance <= radius` as here); memory is one block x the other set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantcore.errors import ConfigError
from quantcore.spec import MANIFOLD_K

K = MANIFOLD_K
BLOCK = 2048


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.float(), b.float()
    d = a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)[None]
    return d.clamp_(min=0)


def knn_radii(features: torch.Tensor, k: int = K) -> torch.Tensor:
    """(N,) squared distance of each point to its k-th nearest neighbour, itself not counted."""
    if features.shape[0] <= k:
        raise ConfigError(
            f"precision/recall with k={k} needs more than {k} images per set, got {features.shape[0]}"
        )
    radii = []
    for block in features.split(BLOCK):
        # the k+1 smallest include the point itself at distance 0
        radii.append(_squared_distances(block, features).topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """(N_points,) bool: whether each point lies in some ball (centre, radius)."""
    hits = []
    for block in points.split(BLOCK):
        hits.append((_squared_distances(block, centres) <= radii[None]).any(1))
    return torch.cat(hits)


@dataclass
class PrecisionRecall:
    """Per-point indicators (what the bootstrap resamples) and their means."""

    samples_inside_reference: torch.Tensor  # (N_samples,) bool
    reference_inside_samples: torch.Tensor  # (N_reference,) bool

    @property
    def precision(self) -> float:
        return float(self.samples_inside_reference.double().mean())

    @property
    def recall(self) -> float:
        return float(self.reference_inside_samples.double().mean())


def precision_recall(
    reference: torch.Tensor,
    samples: torch.Tensor,
    k: int = K,
    reference_radii: torch.Tensor | None = None,
) -> PrecisionRecall:
    """Precision and recall of `samples` (N, D) against `reference` (M, D); pass `reference_radii` to
    reuse the reference manifold across sample sets."""
    samples = samples.to(reference.device)
    if reference_radii is None:
        reference_radii = knn_radii(reference, k)
    return PrecisionRecall(
        samples_inside_reference=inside(samples, reference, reference_radii),
        reference_inside_samples=inside(reference, samples, knn_radii(samples, k)),
    )
