"""Gaussian statistics of feature sets and the Fréchet distance between them (FID, sFID, proxy-FID).

    d^2 = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))

All in float64 torch on the features' device (bootstrap replicates on a GPU take milliseconds).
tr((S_a S_b)^(1/2)) is the sum of the square roots of the eigenvalues of R S_b R with R = S_a^(1/2),
a symmetric PSD matrix: two symmetric eigendecompositions instead of a general `sqrtm`. A set of
N < D features has a rank-deficient covariance S = Y^T Y (Y: N x D, centred and scaled); then the same
trace comes from an N x N matrix -- eigenvalues of Y S_other Y^T, or the singular values of Y_a Y_b^T
when both sides are such sets -- which is what makes FID of a few hundred images cheap on a CPU.
"""

from __future__ import annotations

import torch

from quantcore.errors import ConfigError

CHUNK = 4096  # feature rows per float64 block: bounds the float64 copy of a large set


class Gaussian:
    """Mean (D,) and covariance (D, D) of a feature set, float64; built from features or from moments."""

    def __init__(self, mu: torch.Tensor, sigma: torch.Tensor | None, factor: torch.Tensor | None = None):
        self.mu = mu
        self._sigma = sigma
        self.factor = factor  # Y with Y^T Y = sigma, kept only while N < D
        self._root: torch.Tensor | None = None

    @classmethod
    def from_moments(cls, mu, sigma) -> Gaussian:
        mu = torch.as_tensor(mu, dtype=torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=mu.device)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ConfigError(
                f"statistics do not fit: mean {tuple(mu.shape)}, covariance {tuple(sigma.shape)}"
            )
        return cls(mu, sigma)

    @classmethod
    def of(cls, features: torch.Tensor, weights: torch.Tensor | None = None) -> Gaussian:
        """Statistics of features (N, D); `weights` (N,) are bootstrap counts summing to N (None: all 1).

        The covariance is the unbiased one (divided by N - 1), as `numpy.cov` and the ADM evaluator.
        """
        features = torch.as_tensor(features)
        if features.ndim != 2 or features.shape[0] < 2:
            raise ConfigError(
                f"a covariance needs at least 2 feature rows (N, D), got shape {tuple(features.shape)}"
            )
        n, dim = features.shape
        if weights is None:
            weights = torch.ones(n, dtype=torch.float64, device=features.device)
        weights = weights.to(features.device, torch.float64)
        mu = (
            sum(
                (w @ x.double() for w, x in zip(weights.split(CHUNK), features.split(CHUNK), strict=True)),
                torch.zeros(dim, dtype=torch.float64, device=features.device),
            )
            / weights.sum()
        )
        scale = (weights / (weights.sum() - 1)).sqrt()[:, None]
        if n < dim:
            return cls(mu, None, factor=(features.double() - mu) * scale)
        sigma = torch.zeros(dim, dim, dtype=torch.float64, device=features.device)
        for s, x in zip(scale.split(CHUNK), features.split(CHUNK), strict=True):
            y = (x.double() - mu) * s
            sigma += y.T @ y
        return cls(mu, sigma)

    @property
    def dim(self) -> int:
        return self.mu.shape[0]

    @property
    def sigma(self) -> torch.Tensor:
        if self._sigma is None:
            self._sigma = self.factor.T @ self.factor
        return self._sigma

    def trace(self) -> torch.Tensor:
        return self.factor.square().sum() if self.factor is not None else self.sigma.trace()

    def root(self) -> torch.Tensor:
        """S^(1/2), computed once (a reference's is reused by every replicate measured against it)."""
        if self._root is None:
            w, v = torch.linalg.eigh(self.sigma)
            self._root = (v * w.clamp(min=0).sqrt()) @ v.T
        return self._root

    def to(self, device: torch.device | str) -> Gaussian:
        moved = Gaussian(self.mu.to(device), None if self._sigma is None else self._sigma.to(device))
        moved.factor = None if self.factor is None else self.factor.to(device)
        return moved


def _sum_sqrt_eigenvalues(symmetric: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigvalsh(symmetric).clamp(min=0).sqrt().sum()


def trace_sqrt_product(a: Gaussian, b: Gaussian) -> torch.Tensor:
    """tr((S_a S_b)^(1/2)), through the smallest matrix the two sets allow."""
    if a.factor is not None and b.factor is not None:
        return torch.linalg.svdvals(a.factor @ b.factor.T).sum()
    if a.factor is not None or b.factor is not None:
        low, full = (a, b) if a.factor is not None else (b, a)
        return _sum_sqrt_eigenvalues(low.factor @ full.sigma @ low.factor.T)
    if a._root is not None and b._root is None:  # reuse the root already there
        a, b = b, a
    root = b.root()
    return _sum_sqrt_eigenvalues(root @ a.sigma @ root)


def frechet_distance(a: Gaussian, b: Gaussian) -> float:
    """The Fréchet distance between two Gaussians of the same dimension."""
    if a.dim != b.dim:
        raise ConfigError(f"feature dimensions differ: {a.dim} vs {b.dim}")
    b = b.to(a.mu.device) if b.mu.device != a.mu.device else b
    diff = a.mu - b.mu
    return float(diff @ diff + a.trace() + b.trace() - 2 * trace_sqrt_product(a, b))


def fid_of_features(features_a, features_b) -> float:
    """Fréchet distance between the Gaussians of two feature sets (N, D)."""
    return frechet_distance(Gaussian.of(features_a), Gaussian.of(features_b))
