"""Image tokenizers: pixels <-> token grids (discrete codes, or KL-16's continuous latents), by name.

Each tokenizer family contributes (config, model class, loader) entries to TOKENIZERS.
"""

from __future__ import annotations

from pathlib import Path

import torch

from quantcore.errors import ConfigError
from quantcore.tokenizers.kl16 import KL_CONFIGS, AutoencoderKL, load_kl
from quantcore.tokenizers.maskgit_vqgan import MASKGIT_CONFIGS, MaskGITVQGAN, load_maskgit
from quantcore.tokenizers.var_vqvae import VAR_VQ_CONFIGS, VQVAE, load_var_vqvae
from quantcore.tokenizers.vq16 import VQ_CONFIGS, VQConfig, VQModel, load_vq

TOKENIZERS = {name: (cfg, VQModel, load_vq) for name, cfg in VQ_CONFIGS.items()}
TOKENIZERS.update({name: (cfg, VQVAE, load_var_vqvae) for name, cfg in VAR_VQ_CONFIGS.items()})
TOKENIZERS.update({name: (cfg, MaskGITVQGAN, load_maskgit) for name, cfg in MASKGIT_CONFIGS.items()})
TOKENIZERS.update({name: (cfg, AutoencoderKL, load_kl) for name, cfg in KL_CONFIGS.items()})


def register_tokenizer(name: str, config, model_class, loader) -> None:
    TOKENIZERS[name] = (config, model_class, loader)


def _entry(name: str):
    if name not in TOKENIZERS:
        raise ConfigError(f"unknown tokenizer {name!r}; known: {', '.join(sorted(TOKENIZERS))}")
    return TOKENIZERS[name]


def build_tokenizer(name: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The named tokenizer with random weights (tests, and before an artifact's weights load)."""
    config, model_class, _ = _entry(name)
    with torch.device(device):
        return model_class(config).eval()


def load_tokenizer(name: str, checkpoint: str | Path | None = None, device: str | torch.device = "cpu"):
    if checkpoint is None:
        return build_tokenizer(name, device)
    return _entry(name)[2](checkpoint, name, device)


def downsample_factor(name: str) -> int:
    return _entry(name)[0].downsample_factor


__all__ = [
    "VQ_CONFIGS",
    "VQConfig",
    "VQModel",
    "load_vq",
    "VAR_VQ_CONFIGS",
    "VQVAE",
    "load_var_vqvae",
    "KL_CONFIGS",
    "AutoencoderKL",
    "load_kl",
    "TOKENIZERS",
    "build_tokenizer",
    "load_tokenizer",
]
