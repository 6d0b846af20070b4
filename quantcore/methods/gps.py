"""Gain-Projected Scaling (paper Eq. 16): closed-form per-channel scales from the quantization errors.

The anchor k is the input channel with the largest range; s_k = sqrt(R_x(k) / R_W(k)) balances it like
SmoothQuant at alpha 0.5, and every other channel is placed relative to it,
s_i = s_k * (||x_i||^2 ||dW_:,i||^2 / (||dx_i||^2 ||W^_:,i||^2))^(1/4), the minimiser of the second-order
proxy A_i s_i^2/s_k^2 + B_i s_k^2/s_i^2. dx quantizes every channel with the anchor's per-channel
(delta_k, zp_k), which simulates per-tensor quantization at the anchor's range. Folded like SmoothQuant.

Official mode computes the statistics per calibration batch (ranges and anchor of that batch, averaged
with an EMA for VAR/PAR; RAR's one batch is the whole set); staged mode streams them over the set. The
official RAR also centres its head (which has no GPS) a second time here.
"""

from __future__ import annotations

from typing import Literal

from quantcore.deferred import deferred
from quantcore.errors import ConfigError, QuantcoreError
from quantcore.methods.registry import PassConfig, PassHandler, register_pass
from quantcore.methods.shift import shift_site
from quantcore.methods.smoothquant import as_weight_list

torch = deferred("torch")
quantizer = deferred("quantcore.quant.quantizer")

SHARED_MODES = ("first", "concat")


class GPS(PassConfig):
    kind: Literal["gps"] = "gps"
    shared: Literal["first", "concat"] = "first"  # linears sharing an input: official uses the first


class GPSStats:
    """Streaming statistics for GPS of one layer input.

    Built from the per-channel activation quantizer of the input (scale, zero_point: (C,)) and the
    exact per-channel min/max over the calibration tokens. `update(x)` accumulates, per channel,
    sum x_i^2 and sum (x_i - Q_k(x_i))^2 in float64. Feed only the tokens that count.
    """

    def __init__(self, act_scale, act_zero_point, act_min, act_max, n_bits: int):
        self.n_bits = quantizer.check_bits(n_bits)
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

    def update(self, x) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        xq = quantizer.fake_quant(x, self.anchor_scale, self.anchor_zero_point, self.n_bits)
        self.sum_sq += x.square().sum(dim=0, dtype=torch.float64)
        self.sum_err_sq += (x - xq).square().sum(dim=0, dtype=torch.float64)
        self.count += x.shape[0]


def gps_scales(stats: GPSStats, weight, weight_hat, shared: str = "first"):
    """Closed-form GPS scales s (C,), float32.

    `weight_hat` is the per-row fake-quantized weight(s). Weights sharing the input: "first" uses only
    the first (as the official code does for PAR w1/w3), "concat" stacks their rows. Channels whose
    numerator or denominator is 0 get s_i = 1 (the official code gives 0 for a zero numerator, which
    would divide x by zero).
    """
    if stats.count == 0:
        raise QuantcoreError("GPSStats saw no tokens; call update() with calibration activations first")
    if shared not in SHARED_MODES:
        raise ConfigError(f"shared must be one of {SHARED_MODES}, got {shared!r}")
    weights, hats = as_weight_list(weight), as_weight_list(weight_hat)
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


@register_pass(GPS)
class GPSPass(PassHandler):
    def run(self, ctx) -> dict:
        ctx.channel_ranges("gps-ranges")
        sites = {site.linears[0]: site for site in ctx.layout.fold_sites if site.gps}
        weights = {}
        for name, site in sites.items():
            linears = ctx.linears(site)
            for linear in linears:
                linear.calibrate_weight()
            weights[name] = ([m.weight for m in linears], [m.quantized_weight() for m in linears])
        scales, anchors = (
            self._per_batch(ctx, sites, weights)
            if ctx.plan.sequential
            else self._streamed(ctx, sites, weights)
        )
        summary = {}
        for i, site in enumerate(ctx.layout.fold_sites):
            name = site.linears[0]
            if name in scales:
                s = scales[name]
                ctx.fold_scale(site, s)
                summary[name] = {"anchor": anchors[name], "min": float(s.min()), "max": float(s.max())}
            elif ctx.plan.head_second_shift:
                summary[name] = {"second_shift_abs_max": shift_site(ctx, site)}
            ctx.layer_done("gps", site, i)
        return summary

    def _streamed(self, ctx, sites, weights):
        """Staged: ranges from the channel sweep, sums over the whole set."""
        stats = {}
        for name in sites:
            q = ctx.model.get_submodule(name).input_quantizer
            stats[name] = GPSStats(q.scale, q.zero_point, q.observed_min, q.observed_max, ctx.a_bits)
        ctx.fp_sweep("gps", lambda name, x, pos: stats[name].update(ctx.non_sink(sites[name], x, pos)), sites)
        scales = {name: gps_scales(stats[name], *weights[name], self.config.shared) for name in sites}
        return scales, {name: stats[name].anchor for name in sites}

    def _per_batch(self, ctx, sites, weights):
        """Official: each batch's own ranges, anchor and sums give scales, averaged over the batches."""
        scales, anchors = {}, {}

        def observe(name, x, pos):
            x = ctx.non_sink(sites[name], x, pos).float()
            q = ctx.model.get_submodule(name).input_quantizer
            stats = GPSStats(q.scale, q.zero_point, x.amin(dim=0), x.amax(dim=0), ctx.a_bits)
            stats.update(x)
            scales[name] = ctx.average(
                scales.get(name), gps_scales(stats, *weights[name], self.config.shared)
            )
            anchors.setdefault(name, []).append(stats.anchor)

        ctx.fp_sweep("gps", observe, sites)
        return scales, anchors
