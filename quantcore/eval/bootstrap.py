"""Bootstrap intervals: how far a figure moves when its image set is drawn again at the same size.

A replicate draws N images with replacement from the N evaluated (multinomial counts per image) and
recomputes the metric with those counts as weights. The interval is the normal one, value +- 1.96 sd of
the replicates: FID's replicates sit above the value (duplicated images shrink a set, and FID grows as
sets shrink), so percentiles of the replicates would not even contain it, while their spread is the
sampling noise of a set this size. Sets sampled under the same seeds (quantized vs FP) share one draw
per replicate, so the pairing survives. Fixed statistics (a reference's mu/sigma) are not resampled:
the interval is the noise of the generated side.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LEVEL = 0.95
Z = 1.959964  # two-sided 95% of a normal


def bootstrap_counts(n: int, replicates: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(replicates, n) float64 counts, each row a draw of n indices with replacement (sums to n)."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n, (replicates, n), generator=generator)
    counts = torch.zeros(replicates, n, dtype=torch.float64)
    counts.scatter_add_(1, draws, torch.ones_like(counts))
    return counts.to(device)


def interval(
    metric: Callable[[torch.Tensor], float],
    counts: torch.Tensor,
    value: float,
    bounds: tuple[float, float],
) -> list[float]:
    """value +- Z * (sd of `metric(weights)` over the rows of `counts`), clipped to the metric's range."""
    spread = Z * torch.tensor([metric(row) for row in counts], dtype=torch.float64).std().item()
    return [max(bounds[0], value - spread), min(bounds[1], value + spread)]
