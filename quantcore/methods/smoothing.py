"""Per-input-channel scaling math: SmoothQuant, the symmetric (zero-centering) shift, and GPS.

Pure tensor math, independent of any model. Convention for a layer y = x W^T + b with input
channels i: the layer is rewritten to see x' = x / s - p with W' = W * s (column i scaled by s_i)
and b' = b + W' p, so y is unchanged. The caller folds 1/s and p into the producer of x.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from quantcore.errors import ConfigError, QuantcoreError
from quantcore.quant.quantizer import check_bits, fake_quant

Weights = torch.Tensor | Sequence[torch.Tensor]
SHARED_MODES = ("first", "concat")


def _as_list(weight: Weights) -> list[torch.Tensor]:
    weights = [weight] if isinstance(weight, torch.Tensor) else list(weight)
    if not weights or any(w.dim() != 2 for w in weights):
        raise ConfigError("expected one (out, in) weight or a non-empty list of them")
    if len({w.shape[1] for w in weights}) != 1:
        raise ConfigError(
            f"weights sharing an input must agree on in_features, got {[w.shape for w in weights]}"
        )
    return weights


def smoothquant_scales(
    act_absmax: torch.Tensor, weight: Weights, alpha: float = 0.5, eps: float = 1e-6
) -> torch.Tensor:
    """s_i = max|x_i|^alpha / max|W_:,i|^(1-alpha), the weight max taken over all weights sharing x."""
    w_absmax = torch.stack([w.detach().abs().amax(dim=0).float() for w in _as_list(weight)]).amax(dim=0)
    if act_absmax.shape != w_absmax.shape:
        raise ConfigError(
            f"act_absmax has shape {tuple(act_absmax.shape)}, weights have {w_absmax.numel()} inputs"
        )
    return act_absmax.float().clamp(min=eps).pow(alpha) / w_absmax.clamp(min=eps).pow(1 - alpha)


def symmetric_shift(scale: torch.Tensor, zero_point: torch.Tensor, n_bits: int) -> torch.Tensor:
    """p_i = (2^(b-1) - 1 - zp_i) * delta_i: x - p puts channel i's grid at zero point 2^(b-1)-1,
    i.e. range about [-(2^(b-1)-1) delta_i, 2^(b-1) delta_i], centred on zero."""
    check_bits(n_bits)
    return (2 ** (n_bits - 1) - 1 - zero_point.float()) * scale.float()


class GPSStats:
    """Streaming statistics for Gain-Projected Scaling (paper Eq. 16).

    Built from the per-channel activation quantizer of the layer input (scale, zero_point: (C,))
    and the exact per-channel min/max over the calibration tokens. The anchor k is the channel
    with the largest range; `update(x)` accumulates, per channel, sum x_i^2 and
    sum (x_i - Q_k(x_i))^2 where Q_k quantizes every channel with the anchor's (delta_k, zp_k),
    which simulates per-tensor quantization at the anchor's range. Sums are float64.
    Feed only the tokens that count (sink tokens excluded).
    """

    def __init__(
        self,
        act_scale: torch.Tensor,
        act_zero_point: torch.Tensor,
        act_min: torch.Tensor,
        act_max: torch.Tensor,
        n_bits: int,
    ):
        self.n_bits = check_bits(n_bits)
        self.range_x = (act_max.double() - act_min.double()).flatten()
        channels = self.range_x.numel()
        if act_scale.numel() != channels or act_zero_point.numel() != channels:
            raise ConfigError(
                f"per-channel params have {act_scale.numel()}/{act_zero_point.numel()} entries for {channels} channels"
            )
        self.anchor = int(torch.argmax(self.range_x))
        self.anchor_scale = act_scale.flatten()[self.anchor].float()
        self.anchor_zero_point = act_zero_point.flatten()[self.anchor].float()
        self.sum_sq = torch.zeros(channels, dtype=torch.float64, device=act_max.device)
        self.sum_err_sq = torch.zeros_like(self.sum_sq)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        xq = fake_quant(x, self.anchor_scale, self.anchor_zero_point, self.n_bits)
        self.sum_sq += x.square().sum(dim=0, dtype=torch.float64)
        self.sum_err_sq += (x - xq).square().sum(dim=0, dtype=torch.float64)
        self.count += x.shape[0]


def gps_scales(stats: GPSStats, weight: Weights, weight_hat: Weights, shared: str = "first") -> torch.Tensor:
    """Closed-form GPS scales s (C,), float32.

    s_k = sqrt(R_x(k) / R_W(k)) for the anchor (R_W: max - min of weight column k), and
    s_i = s_k * (||x_i||^2 ||dW_:,i||^2 / (||dx_i||^2 ||W^_:,i||^2))^(1/4), dW = W - W^,
    the minimiser of A_i s_i^2/s_k^2 + B_i s_k^2/s_i^2. `weight_hat` is the per-row fake-quantized
    weight(s). Weights sharing the input: "first" uses only the first (as the official code does
    for PAR w1/w3), "concat" stacks their rows. Channels whose numerator or denominator is 0 get
    s_i = 1 (the official code gives 0 for a zero numerator, which would divide x by zero).
    """
    if stats.count == 0:
        raise QuantcoreError("GPSStats saw no tokens; call update() with calibration activations first")
    if shared not in SHARED_MODES:
        raise ConfigError(f"shared must be one of {SHARED_MODES}, got {shared!r}")
    weights, hats = _as_list(weight), _as_list(weight_hat)
    if [w.shape for w in weights] != [h.shape for h in hats]:
        raise ConfigError("weight_hat must match weight shape for shape")
    if shared == "first":
        weights, hats = weights[:1], hats[:1]
    w = torch.cat([t.detach() for t in weights]).double()
    w_hat = torch.cat([t.detach() for t in hats]).double()
    if w.shape[1] != stats.range_x.numel():
        raise ConfigError(f"weight has {w.shape[1]} inputs, statistics have {stats.range_x.numel()} channels")
    k = stats.anchor
    # A constant anchor column would give s_k = inf; the floor keeps s finite.
    range_w = (w[:, k].max() - w[:, k].min()).clamp(min=1e-8)
    s_k = torch.sqrt(stats.range_x[k] / range_w)
    num = stats.sum_sq * (w - w_hat).square().sum(dim=0)
    den = stats.sum_err_sq * w_hat.square().sum(dim=0)
    valid = (num > 0) & (den > 0)
    ratio = torch.where(valid, num / torch.where(valid, den, 1.0), 1.0)
    s = torch.where(valid, s_k * ratio.pow(0.25), 1.0)
    s[k] = s_k
    return s.float()
