"""Model families, one module each.

A family module exposes: MODELS (name -> ModelEntry), build(config) -> model, generate_tokens(model,
classes, seeds, use_cache=True, progress=None, **sampling), decode_images(model, tokenizer, tokens),
and quant_layout(model); a family whose model needs its tokenizer at run time (VAR builds each
scale's input from the VQ-VAE) also exposes bind_tokenizer(model, tokenizer). Its model has `.family`, `.config` (with num_classes, seq_len, tokenizer),
`.null_class` and `sequence_logits(classes, tokens)` (the teacher-forced calibration pass).
"""

from __future__ import annotations

import importlib
from types import ModuleType

FAMILY_MODULES = {
    "llamagen": "quantcore.models.llamagen",
}


def family_module(family: str) -> ModuleType:
    return importlib.import_module(FAMILY_MODULES[family])


def bind_tokenizer(model, tokenizer) -> None:
    """Give the model its tokenizer where the family needs it to build inputs (VAR); else nothing."""
    bind = getattr(family_module(model.family), "bind_tokenizer", None)
    if bind is not None:
        bind(model, tokenizer)
