"""Class-conditional image generation: a model, its tokenizer and its official sampling defaults."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields

import torch

from quantcore.errors import ConfigError
from quantcore.fastgen import PLANS, FastSampler
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
    """Generates uint8 images (B, H, W, 3); the same seed, weights and software give the same bytes.

    Images run in fixed-size chunks (the last one padded), so every kernel sees the same shapes
    whatever the request size: an image's bytes then depend on its class and seed only, not on the
    other images it was generated with (GEMM blocking, and so rounding, can change with the batch).
    The service relies on this when it batches concurrent requests.

    `fast` decodes each chunk with `quantcore.fastgen.FastSampler` (static KV caches, one CUDA graph per
    step): the same tokens per seed as the family's sampler, without a host sync per token. None (the
    default) uses it on CUDA for the families it supports (LlamaGen raster, RAR, VAR).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: torch.nn.Module,
        defaults,
        source: str,
        chunk_size: int = 8,
        fast: bool | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer.eval()
        self.defaults = defaults
        self.source = source
        self.chunk_size = chunk_size
        if fast is None:
            on_cuda = next(model.parameters()).device.type == "cuda"
            fast = on_cuda and model.family in PLANS and not getattr(model.config, "par_regions", 0)
        self.fast = fast
        self._sampler: tuple[tuple, FastSampler] | None = None  # the last settings' sampler
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
        settings = sampling_settings(self.defaults, sampling).to_dict()
        device = next(self.model.parameters()).device
        generate = family_module(self.model.family).generate_tokens
        out = []
        for start in range(0, len(classes), self.chunk_size):
            labels, chunk_seeds = self._padded(classes, start), self._padded(seeds, start)
            done = start // self.chunk_size * self.model.config.num_tokens
            report = None if progress is None else (lambda n, done=done: progress(done + n))
            if self.fast:
                sampler = self._fast_sampler(settings)
                tokens = sampler.generate(torch.tensor(labels, device=device), chunk_seeds, progress=report)
            else:
                tokens = generate(
                    self.model, torch.tensor(labels, device=device), chunk_seeds, progress=report, **settings
                )
            out.append(tokens[: min(self.chunk_size, len(classes) - start)])
        return torch.cat(out)

    def _fast_sampler(self, settings: dict) -> FastSampler:
        """One sampler (KV caches, graph) at a time: rebuilt when the sampling settings change."""
        key = tuple(sorted(settings.items()))
        if self._sampler is None or self._sampler[0] != key:
            if self._sampler is not None:
                self._sampler[1].close()
                self._sampler = None
            self._sampler = (key, FastSampler(self.model, self.chunk_size, settings))
        return self._sampler[1]

    def _padded(self, values: Sequence[int], start: int) -> list[int]:
        chunk = [int(v) for v in values[start : start + self.chunk_size]]
        return chunk + [chunk[-1]] * (self.chunk_size - len(chunk))

    def progress_total(self, num_images: int) -> int:
        """Tokens a progress callback counts up to for `num_images` images."""
        return -(-num_images // self.chunk_size) * self.model.config.num_tokens

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        decode = family_module(self.model.family).decode_images
        images = []
        for start in range(0, tokens.shape[0], self.chunk_size):
            chunk = tokens[start : start + self.chunk_size]
            padded = torch.cat([chunk, chunk[-1:].expand(self.chunk_size - chunk.shape[0], -1)])
            images.append(decode(self.model, self.tokenizer, padded)[: chunk.shape[0]].cpu())
        return torch.cat(images)

    def generate(
        self, classes: Sequence[int], seeds: Sequence[int], progress=None, **sampling
    ) -> torch.Tensor:
        return self.decode(self.generate_tokens(classes, seeds, progress=progress, **sampling))
