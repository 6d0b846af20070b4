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
- decode_images(model, tokenizer, tokens) -> uint8 (B, H, W, 3); optionally encode_images(model,
  tokenizer, uint8 images) -> tokens in the tokenizer's order (default: tokenizer.encode_to_tokens).
- quant_layout(model) -> quantcore.quant.layout.QuantLayout.
- bind_tokenizer(model, tokenizer), only where the model needs its tokenizer at run time (VAR builds
  each scale's input from the VQ-VAE); keep the tokenizer out of the model's state_dict.
Optional, for families unlike the discrete next-token ones (MAR: continuous tokens, a diffusion head):
- CONTINUOUS_TOKENS = True: tokens are float latents (B, L, C); sequence_logits then returns what the
  head is conditioned on, and fidelity is measured on latents and a loss instead of token ids;
- teacher_forced_loss(model, classes, tokens, generator) -> (B,): the family's own held-out loss;
- training_loss(model, classes, tokens, mask, generator) -> scalar and training_mask on the model: its
  training objective (the zoo trains the others with cross-entropy on sequence_logits);
- CHECKPOINT_KEYS: the wrapper keys of its official files, in order of preference.
`family(name)` is the descriptor that the registry, calibration, evaluation and generation read.
Projections are quantcore.nn.Linear called as linear(x, pos) with the absolute positions passed
down explicitly; attention uses two quantcore.nn.MatMul modules (no fused kernels); AdaLN
modulation is LN(x) * (one + scale) + shift with `one` a buffer registered as None.
A new family adds one line to FAMILY_MODULES below (and its tokenizers to quantcore.tokenizers).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from quantcore.checkpoint import WRAPPER_KEYS

FAMILY_MODULES = {
    "llamagen": "quantcore.models.llamagen",
    "var": "quantcore.models.var",
    "rar": "quantcore.models.rar",
    "mar": "quantcore.models.mar",
}


def family_module(family: str) -> ModuleType:
    return importlib.import_module(FAMILY_MODULES[family])


@dataclass(frozen=True)
class Family:
    """A family as the rest of the engine sees it: its module's contract, optional parts defaulted."""

    name: str
    module: ModuleType

    @property
    def models(self) -> dict:
        return self.module.MODELS

    def build(self, config):
        return self.module.build(config)

    def quant_layout(self, model):
        return self.module.quant_layout(model)

    def decode_images(self, model, tokenizer, tokens):
        return self.module.decode_images(model, tokenizer, tokens)

    def encode_images(self, model, tokenizer, images):
        encode = getattr(self.module, "encode_images", None)
        return tokenizer.encode_to_tokens(images) if encode is None else encode(model, tokenizer, images)

    @property
    def sampling_defaults(self) -> type:
        return self.module.SamplingDefaults

    @property
    def decode_plan(self) -> type | None:
        return getattr(self.module, "DecodePlan", None)

    @property
    def continuous_tokens(self) -> bool:
        return getattr(self.module, "CONTINUOUS_TOKENS", False)

    @property
    def checkpoint_keys(self) -> tuple[str, ...]:
        return getattr(self.module, "CHECKPOINT_KEYS", WRAPPER_KEYS)

    @property
    def training_loss(self):
        """(model, classes, tokens, mask, generator) -> scalar, or None (discrete families: cross-entropy)."""
        return getattr(self.module, "training_loss", None)

    @property
    def teacher_forced_loss(self):
        """(model, classes, tokens, generator) -> per-sequence loss, or None (discrete families: logit KL)."""
        return getattr(self.module, "teacher_forced_loss", None)


def family(name: str) -> Family:
    return Family(name, family_module(name))


def bind_tokenizer(model, tokenizer) -> None:
    """Give the model its tokenizer where the family needs it to build inputs (VAR); else nothing."""
    bind = getattr(family_module(model.family), "bind_tokenizer", None)
    if bind is not None:
        bind(model, tokenizer)
