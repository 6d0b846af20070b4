"""What a model family declares so that quantization passes never look at its internals.

A `FoldSite` is a group of linears that share one input and the module that produces that input.
Passes rewrite the linears to see x' = x / s - p (W' = W * s, b' = b + W' p) and fold 1/s and p into
the producer, so nothing is computed at run time. A producer is either
- a norm with an affine weight (LlamaGen/PAR RMSNorm, MAR LayerNorm): named by its module path; its
  `bias` buffer starts as None and becomes a tensor when a shift is folded in; or
- rows of an AdaLN linear (`AdaLNRows`): x = LN(h) * (one + scale) + shift, where scale and shift are
  chunks of the AdaLN linear's output and `one` is a buffer (None = the constant 1) that becomes the
  vector 1/s once a scale is folded in (reference §5.3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class AdaLNRows:
    linear: str  # the AdaLN linear whose output is n_chunks blocks of C rows, in the family's order
    n_chunks: int
    scale: int  # chunk index of the scale rows feeding this site
    shift: int  # chunk index of the shift rows
    one: str  # dotted path of the buffer standing for the "1 +" (module path + "." + attribute)


@dataclass(frozen=True)
class FoldSite:
    producer: str | AdaLNRows  # a norm's module name, or AdaLN rows
    linears: tuple[str, ...]  # linears reading that output; the first one drives statistics
    gps: bool = True  # whether Gain-Projected Scaling applies (RAR excludes its head)
    head: bool = False  # the LM head: its final input quantizer stays per-tensor


@dataclass(frozen=True)
class OfficialCalibration:
    """How the official PTQ4ARVG code calibrates this family, where the families differ (reference §3, §8,
    pitfalls 8, 17, 19). The recipe's official calibration mode follows it; its options can override."""

    batch_size: int | None = None  # rows per calibration forward; None: the whole set in one (RAR)
    ema: float | None = None  # running average of parameters and scales over those batches (VAR/PAR 0.9)
    include_zero: bool = False  # RAR clamps every uniform (non-token-wise) range to contain 0
    causal_mask: bool = True  # VAR's calibration forward runs without the block-causal mask
    recalibrate_all: bool = True  # RAR's last forward sets only the quantizers its passes reset
    head_second_shift: bool = False  # RAR centres its head (no GPS) once more when GPS is absorbed
    dgc_batch: int | None = None  # VAR/PAR pick cond/uncond within generation batches of 32 images
    exclude_last_class: bool = False  # VAR/RAR draw calibration labels with randint(0, 999)


@dataclass(frozen=True)
class QuantLayout:
    fold_sites: tuple[FoldSite, ...]
    plain_linears: tuple[str, ...]  # quantized, never scaled (wo, w2, proj, fc2)
    matmuls: tuple[str, ...]  # attention matmul sites: (q, k^T) and (probs, v)
    prob_matmuls: tuple[str, ...]  # matmuls whose first operand is a softmax output
    sink_positions: tuple[int, ...]  # excluded from smoothing statistics (reference §4)
    position_groups: torch.Tensor  # STWQ: group id of each absolute position (default table)
    seq_len: int
    feature_module: str  # module whose output at token 0 DGC ranks (the last transformer block)
    log_sqrt2_probs: bool = False  # PAR quantizes attention probabilities with log-sqrt2
    # per-linear STWQ tables overriding `position_groups` in both STWQ modes (RAR's per-position
    # AdaLN input; VAR's AdaLN condition has no token axis: a one-group table means per-tensor)
    linear_groups: dict[str, torch.Tensor] = field(default_factory=dict)
    # per-linear tables for per-position STWQ where plain arange(seq_len) does not fit (RAR's final
    # AdaLN sees positions 1.. only)
    per_position_groups: dict[str, torch.Tensor] = field(default_factory=dict)
    official: OfficialCalibration = OfficialCalibration()
    unmasked_forward: bool = False  # sequence_logits(..., masked=False) exists (VAR)

    @property
    def all_linears(self) -> tuple[str, ...]:
        return tuple(name for site in self.fold_sites for name in site.linears) + self.plain_linears

    def groups_for(self, linear: str, per_position: bool) -> torch.Tensor:
        own = self.linear_groups.get(linear)
        if not per_position:
            return self.position_groups if own is None else own
        if linear in self.per_position_groups:
            return self.per_position_groups[linear]
        if own is not None and int(own.max()) == 0:
            return own  # no token axis: stays per-tensor
        return torch.arange(self.seq_len)


def _ensure_bias(module: nn.Module, size: int, like: torch.Tensor, parameter: bool) -> torch.Tensor:
    if module.bias is None:
        zeros = torch.zeros(size, dtype=like.dtype, device=like.device)
        if parameter:
            module.bias = nn.Parameter(zeros, requires_grad=False)
        else:
            module.bias = zeros
    return module.bias


def _rows(ada: AdaLNRows, chunk: int, channels: int) -> slice:
    return slice(chunk * channels, (chunk + 1) * channels)


def _divide_(t: torch.Tensor, s: torch.Tensor) -> None:
    t.copy_((t.double() / (s if t.dim() == 1 else s[:, None])).to(t.dtype))


@torch.no_grad()
def fold_scale(model: nn.Module, site: FoldSite, s: torch.Tensor) -> None:
    """Make the site's linears see x / s: the producer divides, the linears' weight columns multiply."""
    if isinstance(site.producer, AdaLNRows):
        ada = site.producer
        linear = model.get_submodule(ada.linear)
        s = s.to(linear.weight.device, torch.float64)
        for chunk in (ada.scale, ada.shift):
            rows = _rows(ada, chunk, s.numel())
            _divide_(linear.weight[rows], s)
            _divide_(linear.bias[rows], s)
        owner_path, _, attr = ada.one.rpartition(".")
        owner = model.get_submodule(owner_path)
        one = getattr(owner, attr)
        one = torch.ones_like(s) if one is None else one.double()
        setattr(owner, attr, (one / s).to(linear.weight.dtype))
    else:
        norm = model.get_submodule(site.producer)
        s = s.to(norm.weight.device, torch.float64)
        _divide_(norm.weight, s)
        if norm.bias is not None:
            _divide_(norm.bias, s)
    for name in site.linears:
        linear = model.get_submodule(name)
        linear.weight.copy_((linear.weight.double() * s).to(linear.weight.dtype))


@torch.no_grad()
def fold_shift(model: nn.Module, site: FoldSite, p: torch.Tensor) -> None:
    """Make the site's linears see x - p: the producer's bias absorbs -p, each linear's bias W p."""
    if isinstance(site.producer, AdaLNRows):
        linear = model.get_submodule(site.producer.linear)
        p = p.to(linear.weight.device, torch.float64)
        bias = linear.bias[_rows(site.producer, site.producer.shift, p.numel())]
    else:
        norm = model.get_submodule(site.producer)
        p = p.to(norm.weight.device, torch.float64)
        bias = _ensure_bias(norm, p.numel(), norm.weight, parameter=False)
    bias.copy_((bias.double() - p).to(bias.dtype))
    for name in site.linears:
        linear = model.get_submodule(name)
        b = _ensure_bias(linear, linear.weight.shape[0], linear.weight, parameter=True)
        b.copy_((b.double() + linear.weight.double() @ p).to(b.dtype))
