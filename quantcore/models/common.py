"""What every model family shares: the registry entry and the sampling primitives."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ModelEntry:
    """A named model of this family: its config, official files and official sampling settings."""

    name: str
    config: object  # the family's frozen config dataclass
    sampling: object  # the family's frozen sampling-defaults dataclass (with to_dict())
    official_checkpoints: tuple[str, ...] = ()
    notes: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then nucleus filtering on the last dim (the official LlamaGen/PAR semantics)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum > top_p
        drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses the threshold
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One sample per row of probs (B, N, V), each image drawing from its own generator.

    Per-image generators make an image depend on its seed only, not on the batch it was served in.
    """
    u = torch.stack([torch.rand(probs.shape[1], generator=g, dtype=torch.float64) for g in generators])
    return draw_from(probs, u.to(probs.device))


def draw_from(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF samples of probs (B, N, V) for uniforms u (B, N) in [0, 1): no host sync."""
    cdf = probs.double().cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[..., -1])[..., None]).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)


def modulate(
    x: torch.Tensor, one: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """AdaLN's x * (1 + scale) + shift, where `one` (None = the constant 1) becomes the vector 1/s once
    a smoothing scale is folded into the AdaLN rows (quantcore.quant.layout.AdaLNRows)."""
    return x * ((1.0 if one is None else one) + scale) + shift
