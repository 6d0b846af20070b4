"""The proxy classifier: a small CNN on 32x32 RGB Fashion-MNIST whose 256-d penultimate features stand in
for Inception's in the proxy metrics (proxy-FID, proxy-IS, proxy class accuracy)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from quantcore.errors import ConfigError

FEATURE_DIM = 256


def _stage(in_ch: int, out_ch: int) -> nn.Sequential:
    """Two 3x3 conv + BN + ReLU, then halve the resolution."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
        nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class ProxyClassifier(nn.Module):
    def __init__(self, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        self.image_size = image_size
        self.stages = nn.Sequential(_stage(3, 32), _stage(32, 64), _stage(64, 128))
        self.fc = nn.Linear(128 * (image_size // 8) ** 2, FEATURE_DIM)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1] on the model's device (the VQ's scaling)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ConfigError(f"expected uint8 images (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ConfigError(
                f"the proxy classifier takes {self.image_size}px images, got {images.shape[1:3]}"
            )
        weight = self.fc.weight
        return images.permute(0, 3, 1, 2).to(weight.device, weight.dtype) / 127.5 - 1.0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate (post-ReLU) features (B, 256) of float images (B, 3, H, W) in [-1, 1]."""
        return F.relu(self.fc(self.stages(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))
