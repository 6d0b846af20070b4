"""Bundled models: small generators trained by the project on Fashion-MNIST, so that every quality
claim can be measured offline.

- `VQ-zoo`: a LlamaGen VQ (same class, smaller config) that maps 32x32 RGB to 8x8 tokens of 512 codes;
- `tiny-llamagen` (raster order) and `tiny-par` (PAR, 4 regions): class-conditional LlamaGen models on
  those tokens, trained with 10% class dropout so classifier-free guidance works;
- a proxy classifier (`classifier.ProxyClassifier`) for the proxy metrics in `quantcore.eval.proxy`.

Weights live in `weights/` (safetensors, fp16 storage) with `training.json`, written by
`python -m quantcore.zoo.train all --out quantcore/zoo/weights`. Nothing here runs torch at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from quantcore.checkpoint import load_checkpoint
from quantcore.errors import ConfigError
from quantcore.generation import ImageGenerator
from quantcore.models.common import ModelEntry
from quantcore.models.llamagen import LlamaGen, LlamaGenConfig, SamplingDefaults
from quantcore.tokenizers.vq16 import VQConfig, VQModel
from quantcore.zoo.classifier import ProxyClassifier
from quantcore.zoo.data import load_fashion_mnist, to_rgb32

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
TINY_CONFIGS = {
    "tiny-llamagen": LlamaGenConfig(**_TINY),
    "tiny-par": LlamaGenConfig(**_TINY, par_regions=4),
}
# Chosen from the CFG sweep in training.json: the scale with the best proxy-FID among those >= 80% accuracy.
CFG_SCALES = {"tiny-llamagen": 2.0, "tiny-par": 2.0}
NOTES = (
    "trained by the project on Fashion-MNIST (32x32 RGB, 8x8 tokens of VQ-zoo); quality figures are "
    "proxies (quantcore/zoo/weights/training.json)"
)


class BundledModel(NamedTuple):
    entry: ModelEntry
    checkpoint: Path
    tokenizer_checkpoint: Path


BUNDLED: dict[str, BundledModel] = {
    name: BundledModel(
        ModelEntry(
            name,
            config,
            SamplingDefaults(cfg_scale=CFG_SCALES[name]),
            notes=NOTES,
            tags=("bundled", "fashion-mnist"),
        ),
        WEIGHTS_DIR / f"{name}.safetensors",
        TOKENIZER_WEIGHTS,
    )
    for name, config in TINY_CONFIGS.items()
}


def bundled_entries() -> list[ModelEntry]:
    """The registry entries of the bundled generators."""
    return [b.entry for b in BUNDLED.values()]


def load_zoo_tokenizer(
    path: str | Path = TOKENIZER_WEIGHTS, config_name: str = ZOO_VQ_NAME, device: str | torch.device = "cpu"
) -> VQModel:
    """VQ-zoo with weights from `path`; the signature of a `quantcore.tokenizers` loader."""
    if config_name != ZOO_VQ_NAME:
        raise ConfigError(f"the zoo tokenizer is {ZOO_VQ_NAME!r}, not {config_name!r}")
    model = VQModel(ZOO_VQ)
    load_checkpoint(model, path)
    return model.to(device).eval()


def load_classifier(
    path: str | Path = CLASSIFIER_WEIGHTS, device: str | torch.device = "cpu"
) -> ProxyClassifier:
    model = ProxyClassifier()
    load_checkpoint(model, path)
    return model.to(device).eval()


def load_bundled(name: str, device: str | torch.device = "cpu") -> ImageGenerator:
    """An ImageGenerator for a bundled model, with its trained weights and tokenizer."""
    if name not in BUNDLED:
        raise ConfigError(f"unknown bundled model {name!r}; bundled: {', '.join(BUNDLED)}")
    entry, checkpoint, tokenizer_checkpoint = BUNDLED[name]
    model = load_checkpoint(LlamaGen(entry.config), checkpoint).to(device).eval()
    return ImageGenerator(
        model, load_zoo_tokenizer(tokenizer_checkpoint, device=device), entry.sampling, name
    )


@torch.no_grad()
def heldout_sequences(
    model: LlamaGen, tokenizer: VQModel, count: int, root: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes (N,), tokens (N, L) in `model`'s generation order) of the first `count` test images,
    for teacher-forced fidelity (`quantcore.eval.fidelity`): sequences no bundled model trained on."""
    images, labels = load_fashion_mnist("test", root)
    device = tokenizer.quant_conv.weight.device
    raster = tokenizer.encode_to_tokens(torch.from_numpy(to_rgb32(images[:count])).to(device))
    return torch.from_numpy(labels[:count].astype("int64")).to(device), raster[:, model.order.to(device)]
