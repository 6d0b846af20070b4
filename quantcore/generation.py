"""Class-conditional image generation: a model, its tokenizer and its official sampling defaults."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from quantcore.fastgen import TokenSampler
from quantcore.models import family


class ImageGenerator:
    """Generates uint8 images (B, H, W, 3); the same seed, weights and software give the same bytes.

    Tokens come from the family's one sampler in fixed-size chunks (`quantcore.fastgen.TokenSampler`:
    static KV caches, one CUDA graph per step on GPUs), so an image's bytes depend on its class and
    seed only, not on the other images it was generated with. The service relies on this when it
    batches concurrent requests.
    """

    def __init__(
        self, model: torch.nn.Module, tokenizer: torch.nn.Module, defaults, source: str, chunk_size: int = 8
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer.eval()
        self.defaults = defaults
        self.source = source
        self.chunk_size = chunk_size
        self.sampler = TokenSampler(self.model, chunk_size)
        # per quantized layer, the execution path it runs (filled by load_generator for artifacts)
        self.execution: dict[str, dict] = {}

    @property
    def default_sampling(self) -> dict:
        return self.defaults.to_dict()

    @property
    def num_classes(self) -> int:
        return self.model.config.num_classes

    def generate_tokens(self, classes: Sequence[int], seeds: Sequence[int], progress=None, **sampling):
        chosen = {k: v for k, v in sampling.items() if v is not None}
        return self.sampler.generate_tokens(classes, seeds, progress, **{**self.default_sampling, **chosen})

    def progress_total(self, num_images: int) -> int:
        return self.sampler.progress_total(num_images)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        decode = family(self.model.family).decode_images
        images = []
        for start in range(0, tokens.shape[0], self.chunk_size):
            chunk = tokens[start : start + self.chunk_size]
            padded = torch.cat([chunk, chunk[-1:].expand(self.chunk_size - chunk.shape[0], *chunk.shape[1:])])
            images.append(decode(self.model, self.tokenizer, padded)[: chunk.shape[0]].cpu())
        return torch.cat(images)

    def generate(
        self, classes: Sequence[int], seeds: Sequence[int], progress=None, **sampling
    ) -> torch.Tensor:
        return self.decode(self.generate_tokens(classes, seeds, progress=progress, **sampling))
