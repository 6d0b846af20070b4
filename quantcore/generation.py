"""Class-conditional image generation: a model, its tokenizer and its official sampling defaults."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields

import torch

from quantcore.errors import ConfigError
from quantcore.models import family_module


def sampling_settings(defaults, overrides: dict):
    """A family's official sampling defaults with the caller's overrides; unknown names and bad values
    are refused."""
    known = {f.name for f in fields(defaults)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown sampling parameter(s) {unknown}; known: {sorted(known)}")
    merged = {**defaults.to_dict(), **{k: v for k, v in overrides.items() if v is not None}}
    checks = {
        "temperature": (lambda v: v > 0, "> 0"),
        "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
        "top_k": (lambda v: v >= 0, ">= 0"),
        "cfg_scale": (lambda v: v >= 0, ">= 0"),
    }
    for name, (ok, rule) in checks.items():
        if name in merged and not ok(merged[name]):
            raise ConfigError(f"{name} must be {rule}, got {merged[name]}")
    return type(defaults)(**merged)


class ImageGenerator:
    """Generates uint8 images (B, H, W, 3); the same seed, weights and software give the same bytes."""

    def __init__(self, model: torch.nn.Module, tokenizer: torch.nn.Module, defaults, source: str):
        self.model = model.eval()
        self.tokenizer = tokenizer.eval()
        self.defaults = defaults
        self.source = source
        # per quantized layer, the execution path it runs (filled by load_generator for artifacts)
        self.execution: dict[str, dict] = {}

    @property
    def default_sampling(self) -> dict:
        return self.defaults.to_dict()

    @property
    def num_classes(self) -> int:
        return self.model.config.num_classes

    @torch.no_grad()
    def generate_tokens(
        self,
        classes: Sequence[int],
        seeds: Sequence[int],
        progress: Callable[[int], None] | None = None,
        **sampling,
    ) -> torch.Tensor:
        bad = [c for c in classes if not 0 <= int(c) < self.num_classes]
        if bad:
            raise ConfigError(
                f"class labels {bad} out of range; this model has classes 0..{self.num_classes - 1}"
            )
        if len(classes) != len(seeds):
            raise ConfigError(f"got {len(seeds)} seeds for {len(classes)} classes; give one seed per image")
        settings = sampling_settings(self.defaults, sampling)
        device = next(self.model.parameters()).device
        labels = torch.tensor([int(c) for c in classes], device=device)
        return family_module(self.model.family).generate_tokens(
            self.model, labels, [int(s) for s in seeds], progress=progress, **settings.to_dict()
        )

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return family_module(self.model.family).decode_images(self.model, self.tokenizer, tokens).cpu()

    def generate(
        self, classes: Sequence[int], seeds: Sequence[int], progress=None, **sampling
    ) -> torch.Tensor:
        return self.decode(self.generate_tokens(classes, seeds, progress=progress, **sampling))
