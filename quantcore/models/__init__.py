"""Model families, one module each.

A family module exposes: MODELS (name -> ModelEntry), build(config) -> model, generate_tokens(model,
classes, seeds, use_cache=True, progress=None, **sampling), decode_images(model, tokenizer, tokens),
and quant_layout(model). Its model has `.family`, `.config` (with num_classes, seq_len, tokenizer),
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
