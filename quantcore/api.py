"""The engine's entry points for the CLI, the worker and notebooks."""

from __future__ import annotations

from pathlib import Path

import torch

from quantcore.generation import ImageGenerator
from quantcore.registry import get_spec, load_model
from quantcore.tokenizers import VQ_CONFIGS, VQModel, load_vq


def load_tokenizer(
    name: str, checkpoint: str | Path | None = None, device: str | torch.device = "cpu"
) -> VQModel:
    if checkpoint is not None:
        return load_vq(checkpoint, name, device)
    with torch.device(device):
        return VQModel(VQ_CONFIGS[name]).eval()


def load_generator(
    source: str,
    checkpoint: str | Path | None = None,
    tokenizer_checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> ImageGenerator:
    """An image generator for a registered model name (weights from `checkpoint`, else random)."""
    spec = get_spec(source)
    model = load_model(source, checkpoint, device)
    tokenizer = load_tokenizer(spec.config.tokenizer, tokenizer_checkpoint, device)
    return ImageGenerator(model, tokenizer, spec.entry.sampling, source)
