"""Calibration-set selection from a CFG pool of 2N samples (N cond + N uncond).

Pool layout: by default the first N rows are cond and the last N uncond. With `batch_size=b`
(VAR/PAR generate in batches) the pool is interleaved [cond b, uncond b, cond b, ...].
Every selector is deterministic for its inputs and seed, and returns (indices, info) where info
is a small JSON-able dict for the artifact manifest.
"""

from __future__ import annotations

import math

import torch

from quantcore.errors import ConfigError
from quantcore.spec import SELECTIONS

# The official code treats the two groups as equally informative when their distances match this well.
OFFICIAL_ATOL = 1e-3


def cond_mask(num_pool: int, batch_size: int | None = None) -> torch.Tensor:
    """Bool (num_pool,): True where the pool row is a cond sample."""
    if num_pool < 2 or num_pool % 2:
        raise ConfigError(f"a CFG pool has an even number (>= 2) of rows, got {num_pool}")
    b = batch_size or num_pool // 2
    if b < 1 or num_pool % (2 * b):
        raise ConfigError(f"pool of {num_pool} rows is not a whole number of [cond {b}, uncond {b}] batches")
    return (torch.arange(num_pool) // b) % 2 == 0


def _group_counts(idx: torch.Tensor, is_cond: torch.Tensor) -> dict[str, int]:
    n_cond = int(is_cond[idx].sum())
    return {"cond": n_cond, "uncond": int(idx.numel()) - n_cond}


def _summary(d: torch.Tensor) -> dict[str, float]:
    return {"min": float(d.min()), "mean": float(d.mean()), "max": float(d.max())}


def mahalanobis_pinv(samples: torch.Tensor) -> torch.Tensor:
    """Distance of each row to its own group: unbiased covariance, pseudo-inverse, float32 (as official).

    With fewer rows than dimensions every row of a non-degenerate group lands at (n-1)/sqrt(n);
    a degenerate (low-rank) group gets less: identical rows give sqrt((n-1)/n) from float rounding
    of the mean, or 0 if the mean is exact.
    """
    x = samples.reshape(samples.shape[0], -1).float()
    centred = x - x.mean(dim=0)
    cov = centred.T @ centred / (x.shape[0] - 1)
    d2 = ((centred @ torch.linalg.pinv(cov)) * centred).sum(dim=1)
    # Rounding can push a squared distance of ~0 below zero.
    return d2.clamp(min=0).sqrt()


def dgc_official(
    features: torch.Tensor, batch_size: int | None = None, generation_batch: int | None = None
) -> tuple[torch.Tensor, dict]:
    """DGC as the official code does it: the distances only set the cond share.

    Distances are computed within the cond group and within the uncond group. If they agree
    (allclose, atol 1e-3) pct = 0.5, else pct = share of cond among the top-N distances. Each
    generation batch of b then keeps its first round(pct*b) cond and first b - round(pct*b) uncond rows.
    A pool in halves ([cond N | uncond N]) is one batch, or `generation_batch` images at a time (the
    official VAR/PAR select within their batches of 32).
    """
    num_pool = features.shape[0]
    is_cond = cond_mask(num_pool, batch_size)
    n = num_pool // 2
    if batch_size is None and generation_batch is not None and generation_batch < n:
        return _dgc_official_halves(features, is_cond, generation_batch)
    b = batch_size or n
    d_cond = mahalanobis_pinv(features[is_cond])
    d_uncond = mahalanobis_pinv(features[~is_cond])
    equal = torch.allclose(d_cond, d_uncond, atol=OFFICIAL_ATOL)
    if equal:
        pct = 0.5
    else:
        top = torch.topk(torch.cat([d_cond, d_uncond]), n).indices
        pct = int((top < n).sum()) / n
    num_cond = round(pct * b)  # Python's round, as in the official scripts
    chunks = []
    for start in range(0, num_pool, 2 * b):
        chunks.append(torch.arange(start, start + num_cond))
        chunks.append(torch.arange(start + b, start + 2 * b - num_cond))
    idx = torch.cat(chunks)
    info = {
        "method": "dgc-official",
        "pct": pct,
        "distances_allclose": equal,
        "batch_size": b,
        "counts": _group_counts(idx, is_cond),
        "dist_cond": _summary(d_cond),
        "dist_uncond": _summary(d_uncond),
    }
    return idx, info


def _dgc_official_halves(features: torch.Tensor, is_cond: torch.Tensor, g: int) -> tuple[torch.Tensor, dict]:
    """dgc_official on a [cond N | uncond N] pool, selecting within batches of g images (the last may be
    smaller): the first round(pct*size) cond rows of the batch and the first size - that uncond rows."""
    idx, info = dgc_official(features)
    n = features.shape[0] // 2
    chunks = []
    for start in range(0, n, g):
        size = min(g, n - start)
        num_cond = round(info["pct"] * size)
        chunks += [
            torch.arange(start, start + num_cond),
            torch.arange(n + start, n + start + size - num_cond),
        ]
    idx = torch.cat(chunks)
    return idx, {**info, "batch_size": g, "counts": _group_counts(idx, is_cond)}


def pca_mahalanobis(features: torch.Tensor, max_dim: int, rtol: float = 1e-9) -> tuple[torch.Tensor, dict]:
    """Distance of every row to the whole pool in a whitened PCA space of at most `max_dim` dims.

    Components with variance below rtol * the largest are dropped, so the covariance that is
    inverted is well conditioned. Float64.
    """
    x = features.reshape(features.shape[0], -1).double()
    centred = x - x.mean(dim=0)
    _, sing, vh = torch.linalg.svd(centred, full_matrices=False)
    var = sing.square() / (x.shape[0] - 1)
    keep = min(max_dim, int((var > rtol * var[0]).sum())) if var[0] > 0 else 0
    if keep == 0:
        return torch.zeros(x.shape[0], dtype=torch.float64), {"dim": 0, "explained_variance": 0.0}
    z = centred @ vh[:keep].T / var[:keep].sqrt()
    explained = float(var[:keep].sum() / var.sum())
    return z.norm(dim=1), {"dim": keep, "explained_variance": explained}


def dgc_mahalanobis(
    features: torch.Tensor, k: int | None = None, max_dim: int = 32, batch_size: int | None = None
) -> tuple[torch.Tensor, dict]:
    """DGC as the paper describes it: keep the k samples farthest (Mahalanobis) from the pool.

    Features are projected to d = min(D, N // 4, max_dim) whitened principal components (N = pool/2),
    so the estimate stays well conditioned with few samples. k defaults to N. Ties go to the
    earlier row; indices are returned in pool order.
    """
    num_pool = features.shape[0]
    is_cond = cond_mask(num_pool, batch_size)
    n = num_pool // 2
    k = n if k is None else k
    if not 1 <= k <= num_pool:
        raise ConfigError(f"k must be in 1..{num_pool}, got {k}")
    dim = max(1, min(features[0].numel(), n // 4, max_dim))
    dist, pca = pca_mahalanobis(features, dim)
    order = torch.sort(-dist, stable=True).indices
    idx = order[:k].sort().values
    info = {
        "method": "dgc-mahalanobis",
        "k": k,
        "pct": float(is_cond[idx].float().mean()),
        "pca": pca,
        "threshold": float(dist[order[k - 1]]),
        "counts": _group_counts(idx, is_cond),
        "dist": _summary(dist),
    }
    return idx, info


def random_selection(
    num_pool: int, k: int | None = None, seed: int = 0, batch_size: int | None = None
) -> tuple[torch.Tensor, dict]:
    """k rows drawn without replacement with a seeded generator, in pool order."""
    is_cond = cond_mask(num_pool, batch_size)
    k = num_pool // 2 if k is None else k
    if not 1 <= k <= num_pool:
        raise ConfigError(f"k must be in 1..{num_pool}, got {k}")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(num_pool, generator=gen)[:k].sort().values
    return idx, {"method": "random", "k": k, "seed": seed, "counts": _group_counts(idx, is_cond)}


def uniform_selection(
    num_pool: int, k: int | None = None, batch_size: int | None = None
) -> tuple[torch.Tensor, dict]:
    """k rows evenly spaced over the pool (k = N: every other row, so cond/uncond stay balanced)."""
    is_cond = cond_mask(num_pool, batch_size)
    k = num_pool // 2 if k is None else k
    if not 1 <= k <= num_pool:
        raise ConfigError(f"k must be in 1..{num_pool}, got {k}")
    idx = torch.arange(k) * num_pool // k
    return idx, {"method": "uniform", "k": k, "counts": _group_counts(idx, is_cond)}


def select_calibration(
    method: str,
    *,
    features: torch.Tensor | None = None,
    num_pool: int | None = None,
    k: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    max_dim: int = 32,
    generation_batch: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """Dispatch by name. DGC methods need `features` (2N, D); random/uniform need only the pool size.
    `generation_batch`: dgc-official selects within batches of that many images (see dgc_official)."""
    if method not in SELECTIONS:
        raise ConfigError(f"unknown calibration selection {method!r}; expected one of {SELECTIONS}")
    if method.startswith("dgc"):
        if features is None:
            raise ConfigError(f"{method} needs the pool's feature vectors")
        if method == "dgc-official":
            if k is not None and k != features.shape[0] // 2:
                raise ConfigError("dgc-official always keeps half of the pool; leave k unset")
            return dgc_official(features, batch_size, generation_batch)
        return dgc_mahalanobis(features, k, max_dim, batch_size)
    if num_pool is None:
        if features is None:
            raise ConfigError(f"{method} needs num_pool or features")
        num_pool = features.shape[0]
    if method == "random":
        return random_selection(num_pool, k, seed, batch_size)
    return uniform_selection(num_pool, k, batch_size)


def expected_pinv_distance(n: int) -> float:
    """The distance every row of a non-degenerate group of n < D rows gets under `mahalanobis_pinv`."""
    return (n - 1) / math.sqrt(n)
