"""Model families, one module each (quantcore/models/llamagen.py is the reference family).

A family module exposes:
- MODELS: name -> quantcore.models.common.ModelEntry(name, config, sampling, official_checkpoints,
  notes, tags): the official full-size models and `<family>-tiny` test configs (tags=("test",)).
  `config` is a frozen dataclass with num_classes, seq_len (input positions of the teacher-forced
  calibration pass), num_tokens, grid_size, tokenizer (a name in quantcore.tokenizers.TOKENIZERS)
  and to_dict(); `sampling` is a frozen dataclass of the official sampling settings with to_dict().
- build(config) -> model. The model has `family`, `config`, `null_class` (the class id of the
  unconditional CFG half) and sequence_logits(classes (B,), tokens (B, L)) -> logits (B, L, V).
- DecodePlan(model, batch, sampling, compile): the official sampler as static buffers and a step
  (common.DecodePlan), run by quantcore.fastgen (the one sampler: step by step, or replayed from a
  CUDA graph); one seeded uniform stream per image, CFG rows = cond then uncond. `SamplingDefaults`
  is the dataclass of its keywords.
- decode_images(model, tokenizer, tokens) -> uint8 (B, H, W, 3).
- quant_layout(model) -> quantcore.quant.layout.QuantLayout.
- bind_tokenizer(model, tokenizer), only where the model needs its tokenizer at run time (VAR builds
  each scale's input from the VQ-VAE); keep the tokenizer out of the model's state_dict.
Projections are quantcore.nn.Linear called as linear(x, pos) with the absolute positions passed
down explicitly; attention uses two quantcore.nn.MatMul modules (no fused kernels); AdaLN
modulation is LN(x) * (one + scale) + shift with `one` a buffer registered as None.
A new family adds one line to FAMILY_MODULES below (and its tokenizers to quantcore.tokenizers).
"""

from __future__ import annotations

import importlib
from types import ModuleType

FAMILY_MODULES = {
    "llamagen": "quantcore.models.llamagen",
    "var": "quantcore.models.var",
    "rar": "quantcore.models.rar",
    "mar": "quantcore.models.mar",
}


def family_module(family: str) -> ModuleType:
    return importlib.import_module(FAMILY_MODULES[family])


def bind_tokenizer(model, tokenizer) -> None:
    """Give the model its tokenizer where the family needs it to build inputs (VAR); else nothing."""
    bind = getattr(family_module(model.family), "bind_tokenizer", None)
    if bind is not None:
        bind(model, tokenizer)
