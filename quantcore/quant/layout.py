"""What a model family declares so that quantization passes never look at its internals.

A `FoldSite` is a group of linears that share one input and the module that produces that input.
Passes rewrite the linears to see x' = x / s - p (W' = W * s, b' = b + W' p) and fold 1/s and p into
the producer, so nothing is computed at run time. Producers here are norms with an affine weight
(LlamaGen/PAR RMSNorm, MAR LayerNorm); AdaLN rows join when the AdaLN families arrive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class FoldSite:
    producer: str  # module name of the norm whose output feeds the linears
    linears: tuple[str, ...]  # linears reading that output; the first one drives statistics
    gps: bool = True  # whether Gain-Projected Scaling applies (RAR excludes its head)
    head: bool = False  # the LM head: its final input quantizer stays per-tensor


@dataclass(frozen=True)
class QuantLayout:
    fold_sites: tuple[FoldSite, ...]
    plain_linears: tuple[str, ...]  # quantized, never scaled (wo, w2, proj, fc2)
    matmuls: tuple[str, ...]  # attention matmul sites: (q, k^T) and (probs, v)
    prob_matmuls: tuple[str, ...]  # matmuls whose first operand is a softmax output
    sink_positions: tuple[int, ...]  # excluded from smoothing statistics (reference §4)
    position_groups: torch.Tensor  # STWQ: group id of each absolute position
    seq_len: int
    log_sqrt2_probs: bool = False  # PAR quantizes attention probabilities with log-sqrt2
    notes: dict = field(default_factory=dict)

    @property
    def all_linears(self) -> tuple[str, ...]:
        return tuple(name for site in self.fold_sites for name in site.linears) + self.plain_linears

    def per_position_groups(self) -> torch.Tensor:
        return torch.arange(self.seq_len)


def _ensure_bias(module: nn.Module, size: int, like: torch.Tensor, parameter: bool) -> torch.Tensor:
    if module.bias is None:
        zeros = torch.zeros(size, dtype=like.dtype, device=like.device)
        if parameter:
            module.bias = nn.Parameter(zeros, requires_grad=False)
        else:
            module.bias = zeros
    return module.bias


@torch.no_grad()
def fold_scale(model: nn.Module, site: FoldSite, s: torch.Tensor) -> None:
    """Make the site's linears see x / s: the producer divides, the linears' weight columns multiply."""
    norm = model.get_submodule(site.producer)
    s = s.to(norm.weight.device, torch.float64)
    norm.weight.copy_((norm.weight.double() / s).to(norm.weight.dtype))
    if norm.bias is not None:
        norm.bias.copy_((norm.bias.double() / s).to(norm.bias.dtype))
    for name in site.linears:
        linear = model.get_submodule(name)
        linear.weight.copy_((linear.weight.double() * s).to(linear.weight.dtype))


@torch.no_grad()
def fold_shift(model: nn.Module, site: FoldSite, p: torch.Tensor) -> None:
    """Make the site's linears see x - p: the producer's bias absorbs -p, each linear's bias W p."""
    norm = model.get_submodule(site.producer)
    p = p.to(norm.weight.device, torch.float64)
    bias = _ensure_bias(norm, p.numel(), norm.weight, parameter=False)
    bias.copy_((bias.double() - p).to(bias.dtype))
    for name in site.linears:
        linear = model.get_submodule(name)
        b = _ensure_bias(linear, linear.weight.shape[0], linear.weight, parameter=True)
        b.copy_((b.double() + linear.weight.double() @ p).to(b.dtype))
