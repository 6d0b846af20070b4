"""Image tokenizers: pixels <-> discrete token grids for the autoregressive models."""

from quantcore.tokenizers.vq16 import VQ_CONFIGS, VQConfig, VQModel, load_vq

__all__ = ["VQ_CONFIGS", "VQConfig", "VQModel", "load_vq"]
