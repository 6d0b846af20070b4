"""Fidelity of a (quantized) model to its FP reference: the same inputs, how often the same outputs.

- token agreement: tokens sampled under the same classes, seeds and sampling settings;
- teacher-forced logit KL and top-1 agreement: both models read the same held-out sequences, so a
  difference at one position never changes what the next position sees.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from quantcore.errors import ConfigError


def token_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of equal entries between two token tensors (B, L) sampled under the same seeds."""
    if a.shape != b.shape:
        raise ConfigError(f"token tensors differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a == b.to(a.device)).float().mean())


def token_agreement_by_position(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(L,) agreement per generated position: errors compound, so later positions usually agree less."""
    if a.shape != b.shape:
        raise ConfigError(f"token tensors differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a == b.to(a.device)).float().mean(0).cpu()


@torch.no_grad()
def teacher_forced_fidelity(
    reference: nn.Module,
    candidate: nn.Module,
    classes: torch.Tensor,
    tokens: torch.Tensor,
    batch_size: int = 64,
) -> dict[str, float]:
    """Mean KL(reference || candidate) in nats per token and top-1 agreement on sequences (B, L).

    `tokens` are in generation order; each model runs `sequence_logits(classes, tokens)` on its own
    device.
    """
    if classes.shape[0] != tokens.shape[0]:
        raise ConfigError(f"{classes.shape[0]} classes for {tokens.shape[0]} sequences")
    kl_sum, agree_sum, count = 0.0, 0.0, 0
    for c, t in zip(classes.split(batch_size), tokens.split(batch_size), strict=True):
        ref = _logits(reference, c, t).log_softmax(-1)
        cand = _logits(candidate, c, t).log_softmax(-1).to(ref.device)
        kl_sum += float(F.kl_div(cand, ref, log_target=True, reduction="sum"))
        agree_sum += float((ref.argmax(-1) == cand.argmax(-1)).sum())
        count += t.numel()
    return {"logit_kl": kl_sum / count, "top1_agreement": agree_sum / count}


def _logits(model: nn.Module, classes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model.sequence_logits(classes.to(device), tokens.to(device)).double()
