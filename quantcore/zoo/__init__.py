"""Bundled models: small generators trained by the project on Fashion-MNIST, so that every quality
claim can be measured offline.

- `VQ-zoo`: a LlamaGen VQ (same class, smaller config) that maps 32x32 RGB to 8x8 tokens of 512 codes;
- `tiny-llamagen` (raster order) and `tiny-par` (PAR, 4 regions): class-conditional LlamaGen models on
  those tokens, trained with 10% class dropout so classifier-free guidance works;
- `VAR-VQVAE-zoo` (VAR's multi-scale VQ-VAE class, scales 1, 2, 3, 4, 6, 8) and `tiny-var` on its 130 tokens;
- `MaskGIT-zoo` (the MaskGIT VQGAN class, 32x32 -> 8x8 tokens) and `tiny-rar` on its 64 tokens, trained in
  raster order only (the order our RAR sampler decodes in; official RAR trains on random permutations);
- `deep-var` (8 layers) on VAR-VQVAE-zoo's tokens, trained to see whether the activation pathologies the
  paper quantizes against develop in a deeper model (bench/quality/deep-var); `VQ-zoo-16` (the same VQ
  class as VQ-zoo with one downsampling: 32x32 -> 16x16 tokens) and `deep-llamagen` (8 layers) on its
  256 tokens, for the same question (bench/quality/deep-llamagen);
- a proxy classifier (`classifier.ProxyClassifier`) for the proxy metrics in `quantcore.eval.proxy`.

Weights live in `weights/` (safetensors, fp16 storage) with `training.json`, written by
`python -m quantcore.zoo.train all --out quantcore/zoo/weights`. Nothing here runs torch at import time.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch

from quantcore.checkpoint import load_checkpoint
from quantcore.errors import ConfigError
from quantcore.models import family, mar, rar, var
from quantcore.models.common import ModelEntry
from quantcore.models.llamagen import LlamaGenConfig, SamplingDefaults
from quantcore.tokenizers.kl16 import AutoencoderKL, KLConfig
from quantcore.tokenizers.maskgit_vqgan import MaskGITConfig, MaskGITVQGAN
from quantcore.tokenizers.var_vqvae import VQVAE, VARVQConfig
from quantcore.tokenizers.vq16 import VQConfig, VQModel
from quantcore.zoo.classifier import ProxyClassifier
from quantcore.zoo.data import CLASSES, load_fashion_mnist, to_rgb32

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
ZOO_VQ_NAME = "VQ-zoo"
# 32x32 -> 8x8 (two downsamplings); attention only at 8x8, as in VQ-16's lowest level.
ZOO_VQ = VQConfig(
    codebook_size=512,
    codebook_embed_dim=8,
    ch=32,
    ch_mult=(1, 2, 2),
    z_channels=64,
    num_res_blocks=2,
    norm_groups=8,
    usage_window=512,  # the (unused) usage buffer is saved in every file: keep it small
)
TOKENIZER_WEIGHTS = WEIGHTS_DIR / "vq-zoo.safetensors"
ZOO_VQ16_NAME = "VQ-zoo-16"
# 32x32 -> 16x16 (one downsampling): 256 tokens per image, as LlamaGen's VQ-16 gives at 256 px.
ZOO_VQ16 = replace(ZOO_VQ, ch_mult=(1, 2))
ZOO_VAR_VQ_NAME = "VAR-VQVAE-zoo"
# VAR's VQ-VAE at 32x32: two downsamplings to an 8x8 latent, six scales (1+4+9+16+36+64 = 130 tokens).
ZOO_VAR_VQ = VARVQConfig(
    vocab_size=512,
    cvae=16,
    ch=24,
    ch_mult=(1, 2, 2),
    num_res_blocks=1,
    norm_groups=8,
    patch_nums=(1, 2, 3, 4, 6, 8),
)
ZOO_MASKGIT_NAME = "MaskGIT-zoo"
# The MaskGIT VQGAN at 32x32: two average-pool downsamplings to 8x8 tokens.
ZOO_MASKGIT = MaskGITConfig(
    codebook_size=512,
    z_channels=16,
    hidden_channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    norm_groups=8,
)
ZOO_KL_NAME = "KL-zoo"
# MAR's KL VAE at 32x32: two downsamplings to 8x8 latents of 8 channels, attention at 8x8 (as KL-16's
# encoder at its 16x16 level). Rescaled after training so that MAR's 0.2325 gives unit-variance tokens.
ZOO_KL = KLConfig(
    embed_dim=8,
    ch=24,
    ch_mult=(1, 2, 2),
    num_res_blocks=1,
    resolution=32,
    attn_resolutions=(8,),
    norm_groups=8,
)
# name -> (config, model class, weights): every tokenizer the registry learns from the zoo.
ZOO_TOKENIZERS = {
    ZOO_VQ_NAME: (ZOO_VQ, VQModel, TOKENIZER_WEIGHTS),
    ZOO_VQ16_NAME: (ZOO_VQ16, VQModel, WEIGHTS_DIR / "vq-zoo-16.safetensors"),
    ZOO_VAR_VQ_NAME: (ZOO_VAR_VQ, VQVAE, WEIGHTS_DIR / "var-vqvae-zoo.safetensors"),
    ZOO_MASKGIT_NAME: (ZOO_MASKGIT, MaskGITVQGAN, WEIGHTS_DIR / "maskgit-zoo.safetensors"),
    ZOO_KL_NAME: (ZOO_KL, AutoencoderKL, WEIGHTS_DIR / "kl-zoo.safetensors"),
}
CLASSIFIER_WEIGHTS = WEIGHTS_DIR / "proxy-classifier.safetensors"
TRAINING_JSON = WEIGHTS_DIR / "training.json"

_TINY = dict(
    dim=256,
    n_layer=4,
    n_head=8,
    multiple_of=64,
    num_classes=10,
    vocab_size=ZOO_VQ.codebook_size,
    grid_size=8,
    tokenizer=ZOO_VQ_NAME,
)
# what the bundled VAR models share: the zoo's VQVAE and ten classes
_ZOO_VAR = dict(
    num_heads=4,
    num_classes=10,
    vocab_size=ZOO_VAR_VQ.vocab_size,
    cvae=ZOO_VAR_VQ.cvae,
    patch_nums=ZOO_VAR_VQ.patch_nums,
    tokenizer=ZOO_VAR_VQ_NAME,
)
BUNDLED_CONFIGS = {
    "tiny-llamagen": LlamaGenConfig(**_TINY),
    "tiny-par": LlamaGenConfig(**_TINY, par_regions=4),
    # A custom width (the official VAR ties it to 64 * depth) to fit the bundled-weights budget.
    "tiny-var": var.VARConfig(depth=4, embed_dim=112, **_ZOO_VAR),
    "tiny-rar": rar.RARConfig(
        dim=112,
        n_layer=4,
        mlp_dim=448,
        n_head=4,
        num_classes=10,
        codebook_size=ZOO_MASKGIT.codebook_size,
        grid_size=8,
        spare_pos_rows=2,  # the fewest the layout reads: no unused table rows in the file
        spare_timestep_rows=1,
        tokenizer=ZOO_MASKGIT_NAME,
    ),
    # Twice the depth and four times the tokens of tiny-llamagen, at the width the tree's 50 MiB budget
    # leaves beside MAR (fp16, 3.7 MB); the head width stays tiny-llamagen's 32.
    "deep-llamagen": LlamaGenConfig(
        **{**_TINY, "dim": 128, "n_layer": 8, "n_head": 4, "grid_size": 16, "tokenizer": ZOO_VQ16_NAME}
    ),
    "deep-var": var.VARConfig(depth=8, embed_dim=128, **_ZOO_VAR),
    # 64 tokens of 8 channels; the buffer (MAR's sinks) a quarter of the tokens, as 64 of MAR's 256.
    "tiny-mar": mar.MARConfig(
        encoder_dim=96,
        encoder_depth=3,
        decoder_dim=96,
        decoder_depth=3,
        n_head=4,
        diffloss_depth=3,
        diffloss_width=128,
        num_classes=10,
        grid_size=8,
        token_dim=ZOO_KL.embed_dim,
        buffer_size=16,
        calibration_iters=16,
        tokenizer=ZOO_KL_NAME,
    ),
}
FAMILIES = {
    "tiny-llamagen": "llamagen",
    "tiny-par": "llamagen",
    "tiny-var": "var",
    "tiny-rar": "rar",
    "deep-llamagen": "llamagen",
    "deep-var": "var",
    "tiny-mar": "mar",
}
# Chosen from the CFG sweep in training.json: the scale with the best proxy-FID among those >= 80% accuracy.
CFG_SCALES = {
    "tiny-llamagen": 2.0,
    "tiny-par": 2.0,
    "tiny-var": 4.0,
    "tiny-rar": 4.0,
    "deep-llamagen": 2.0,
    "deep-var": 4.0,
    "tiny-mar": 3.0,  # no scale reaches 80% accuracy (best: 0.764 here); 3.0 also has the best proxy-FID
}
# Each family's sampling settings for the tiny models: the official knobs with the swept CFG scale. VAR
# keeps its top-k 900 (all 512 codes) and top-p 0.96; RAR's cosine CFG ramp uses exponent 1.
SAMPLING = {
    "tiny-llamagen": SamplingDefaults(cfg_scale=CFG_SCALES["tiny-llamagen"]),
    "tiny-par": SamplingDefaults(cfg_scale=CFG_SCALES["tiny-par"]),
    "tiny-var": var.SamplingDefaults(cfg_scale=CFG_SCALES["tiny-var"]),
    "tiny-rar": rar.SamplingDefaults(cfg_scale=CFG_SCALES["tiny-rar"], cfg_pow=1.0),
    "deep-llamagen": SamplingDefaults(cfg_scale=CFG_SCALES["deep-llamagen"]),
    "deep-var": var.SamplingDefaults(cfg_scale=CFG_SCALES["deep-var"]),
    # 16 rounds for 64 tokens (the official 64 for 256); 250 of the 1000 diffusion steps: at 50 or 100
    # (the official 100) its samples fail (proxy accuracy 0.10-0.22, 50 images), at 250 and 1000 they
    # reach 0.8 (bench/zoo/README.md): its learned variances do not carry coarser respacings
    "tiny-mar": mar.SamplingDefaults(cfg_scale=CFG_SCALES["tiny-mar"], num_iter=16, num_sampling_steps="250"),
}
NOTES = (
    "trained by the project on Fashion-MNIST (32x32 RGB, {tokens} tokens of {tokenizer}); quality figures "
    "are proxies (quantcore/zoo/weights/training.json){extra}"
)
EXTRA_NOTES = {
    "tiny-rar": "; trained in raster order only (the order the sampler decodes in), not on RAR's random "
    "orders annealed to raster"
}


class BundledModel(NamedTuple):
    entry: ModelEntry
    checkpoint: Path
    tokenizer_checkpoint: Path
    family: str


BUNDLED: dict[str, BundledModel] = {
    name: BundledModel(
        ModelEntry(
            name,
            config,
            SAMPLING[name],
            notes=NOTES.format(
                tokens=config.num_tokens, tokenizer=config.tokenizer, extra=EXTRA_NOTES.get(name, "")
            ),
            tags=("bundled", "fashion-mnist"),
        ),
        WEIGHTS_DIR / f"{name}.safetensors",
        ZOO_TOKENIZERS[config.tokenizer][2],
        FAMILIES[name],
    )
    for name, config in BUNDLED_CONFIGS.items()
}


def class_names(name: str) -> list[str] | None:
    """The label of each class of a bundled model (Fashion-MNIST's); None for the others."""
    return list(CLASSES) if name in BUNDLED else None


def bundled_entries() -> list[ModelEntry]:
    """The registry entries of the bundled generators."""
    return [b.entry for b in BUNDLED.values()]


def load_zoo_tokenizer(
    path: str | Path | None = None, config_name: str = ZOO_VQ_NAME, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """A zoo tokenizer with weights from `path` (default: its bundled file); the signature of a
    `quantcore.tokenizers` loader."""
    if config_name not in ZOO_TOKENIZERS:
        raise ConfigError(
            f"unknown zoo tokenizer {config_name!r}; zoo tokenizers: {', '.join(ZOO_TOKENIZERS)}"
        )
    config, model_class, bundled = ZOO_TOKENIZERS[config_name]
    model = model_class(config)
    load_checkpoint(model, bundled if path is None else path)
    return model.to(device).eval()


def load_classifier(
    path: str | Path = CLASSIFIER_WEIGHTS, device: str | torch.device = "cpu"
) -> ProxyClassifier:
    model = ProxyClassifier()
    load_checkpoint(model, path)
    return model.to(device).eval()


def generation_order(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Tokens (N, L) from the tokenizer's order into `model`'s generation order: LlamaGen permutes
    (PAR), VAR and RAR generate in their tokenizer's order (VAR's is already scale by scale)."""
    order = getattr(model, "order", None)
    return tokens if order is None else tokens[:, order.to(tokens.device)]


@torch.no_grad()
def heldout_sequences(
    model: torch.nn.Module, tokenizer: torch.nn.Module, count: int, root: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes (N,), tokens (N, L) in `model`'s generation order) of the first `count` test images,
    for teacher-forced fidelity (`quantcore.eval.fidelity`): sequences no bundled model trained on."""
    images, labels = load_fashion_mnist("test", root)
    device = next(tokenizer.parameters()).device
    tokens = family(model.family).encode_images(
        model, tokenizer, torch.from_numpy(to_rgb32(images[:count])).to(device)
    )
    return torch.from_numpy(labels[:count].astype("int64")).to(device), generation_order(model, tokens)
