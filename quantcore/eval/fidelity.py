"""Fidelity of a (quantized) model to its FP reference: the same inputs, how often the same outputs.

- token agreement: tokens sampled under the same classes, seeds and sampling settings;
- teacher-forced logit KL and top-1 agreement: both models read the same held-out sequences, so a
  difference at one position never changes what the next position sees.

Families with continuous tokens (MAR) have no token ids to agree on nor logits: their sampled latents are
compared by relative error, and teacher-forced by the relative error of the conditions the transformer
gives the diffusion head and by the family's own loss (the diffusion loss) on the same seeded draws.
`sampled_fidelity` and `teacher_forced` pick the measures that fit the family.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from quantcore.errors import ConfigError
from quantcore.models import family


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
    device = _device(model)
    return model.sequence_logits(classes.to(device), tokens.to(device)).double()


def sampled_fidelity(family_name: str, reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Agreement of tokens sampled under the same classes and seeds: the share of equal ids, or (continuous
    tokens) the relative L2 error of the latents."""
    if not family(family_name).continuous_tokens:
        return {"token_agreement": token_agreement(reference, candidate)}
    if reference.shape != candidate.shape:
        raise ConfigError(
            f"latent tensors differ in shape: {tuple(reference.shape)} vs {tuple(candidate.shape)}"
        )
    ref = reference.double()
    return {"latent_rel_error": float((candidate.to(ref) - ref).norm() / ref.norm().clamp(min=1e-12))}


@torch.no_grad()
def teacher_forced(
    reference: nn.Module, candidate: nn.Module, classes: torch.Tensor, tokens: torch.Tensor, seed: int = 0
) -> dict[str, float]:
    """The teacher-forced measures of the family: logit KL / top-1 agreement, or (a family with its own
    `teacher_forced_loss`) condition error and that loss for both models on the same seeded draws."""
    loss = family(reference.family).teacher_forced_loss
    if loss is None:
        return teacher_forced_fidelity(reference, candidate, classes, tokens)
    ref_z, cand_z = (
        _logits(reference, classes, tokens),
        _logits(candidate, classes, tokens).to(_device(reference)),
    )
    losses = [
        float(
            loss(
                model,
                classes.to(_device(model)),
                tokens.to(_device(model)),
                torch.Generator().manual_seed(seed),
            ).mean()
        )
        for model in (reference, candidate)
    ]
    return {
        "condition_rel_error": float((cand_z - ref_z).norm() / ref_z.norm().clamp(min=1e-12)),
        "diffusion_loss_fp": losses[0],
        "diffusion_loss": losses[1],
    }


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
