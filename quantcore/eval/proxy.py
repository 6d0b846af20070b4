"""Proxy image-quality metrics on the bundled Fashion-MNIST models.

The field's FID/IS use Inception-v3 on ImageNet-like images; here a small CNN trained on Fashion-MNIST
(`quantcore.zoo.classifier`) plays that part. Numbers from it are proxies: comparable with each other
(same classifier weights, same sample counts), never with published FIDs. Every name says "proxy".
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from quantcore.errors import ConfigError
from quantcore.eval.frechet import fid_of_features


@torch.no_grad()
def proxy_features(
    classifier: nn.Module, images: torch.Tensor, batch_size: int = 500
) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features (N, D) float64, class probabilities (N, C) float64) of uint8 images (N, H, W, 3)."""
    classifier.eval()
    feats, probs = [], []
    for part in images.split(batch_size):
        f = classifier.features(classifier.prepare(part))
        feats.append(f.double().cpu())
        probs.append(classifier.head(f).double().softmax(-1).cpu())
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def proxy_fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Proxy-FID between two feature sets (e.g. generated vs the test split, or quantized vs FP samples)."""
    return fid_of_features(torch.from_numpy(features_a), torch.from_numpy(features_b))


def proxy_inception_score(probs: np.ndarray, splits: int = 1) -> float:
    """exp(E_x KL(p(y|x) || p(y))), averaged over `splits` equal parts (the field uses 10 of 5,000)."""
    if probs.ndim != 2 or probs.shape[0] < splits:
        raise ConfigError(f"need class probabilities (N >= {splits}, C), got shape {probs.shape}")
    eps = 1e-12
    scores = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(0, keepdims=True)
        kl = (part * (np.log(part + eps) - np.log(marginal + eps))).sum(1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


def proxy_class_accuracy(probs: np.ndarray, labels: np.ndarray | torch.Tensor) -> float:
    """Fraction of images that the proxy classifier assigns to the class they were generated for."""
    labels = np.asarray(labels)
    if labels.shape != probs.shape[:1]:
        raise ConfigError(f"{labels.shape[0]} labels for {probs.shape[0]} images")
    return float((probs.argmax(1) == labels).mean())


def proxy_metrics(
    classifier: nn.Module,
    images: torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    reference_features: np.ndarray | None = None,
    other_features: np.ndarray | None = None,
) -> dict[str, float]:
    """Proxy metrics of generated uint8 images (N, H, W, 3) made for class `labels` (N,).

    reference_features: the test split's features -> "proxy_fid_test";
    other_features: another image set's (e.g. the FP model's samples, same classes and seeds) ->
    "proxy_fid_other".
    """
    feats, probs = proxy_features(classifier, images)
    out = {
        "proxy_class_accuracy": proxy_class_accuracy(probs, labels),
        "proxy_is": proxy_inception_score(probs),
    }
    if reference_features is not None:
        out["proxy_fid_test"] = proxy_fid(feats, reference_features)
    if other_features is not None:
        out["proxy_fid_other"] = proxy_fid(feats, other_features)
    return out
