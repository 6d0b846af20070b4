"""SmoothQuant: per-input-channel scales that move activation range into the weights.

s_i = max|x_i|^alpha / max|W_:,i|^(1-alpha), from the input of each fold site's first linear (sink tokens
excluded where the site is sink-aware). Convention shared by every scaling pass: the site's linears are
rewritten to see x' = x / s (W' = W * s, column i scaled by s_i) and the producer of x absorbs 1/s, so
nothing is left to compute at run time. With an EMA (official VAR/PAR) each calibration batch gives its
own scales, averaged as the batches come; otherwise the maximum runs over the whole set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from quantcore.deferred import deferred
from quantcore.errors import ConfigError
from quantcore.methods.registry import PassConfig, PassHandler, register_pass

torch = deferred("torch")


class SmoothQuant(PassConfig):
    kind: Literal["smoothquant"] = "smoothquant"
    weight_only = True
    alpha: float = Field(0.5, ge=0.0, le=1.0)


def as_weight_list(weight) -> list:
    """One (out, in) weight or a list of weights that share an input, checked, as a list."""
    weights = [weight] if isinstance(weight, torch.Tensor) else list(weight)
    if not weights or any(w.dim() != 2 for w in weights):
        raise ConfigError("expected one (out, in) weight or a non-empty list of them")
    if len({w.shape[1] for w in weights}) != 1:
        raise ConfigError(
            f"weights sharing an input must agree on in_features, got {[w.shape for w in weights]}"
        )
    return weights


def smoothquant_scales(act_absmax, weight: Sequence | object, alpha: float = 0.5, eps: float = 1e-6):
    """s_i = max|x_i|^alpha / max|W_:,i|^(1-alpha), the weight max taken over all weights sharing x."""
    w_absmax = torch.stack([w.detach().abs().amax(dim=0).float() for w in as_weight_list(weight)]).amax(dim=0)
    if act_absmax.shape != w_absmax.shape:
        raise ConfigError(
            f"act_absmax has shape {tuple(act_absmax.shape)}, weights have {w_absmax.numel()} inputs"
        )
    return act_absmax.float().clamp(min=eps).pow(alpha) / w_absmax.clamp(min=eps).pow(1 - alpha)


@register_pass(SmoothQuant)
class SmoothQuantPass(PassHandler):
    def run(self, ctx) -> dict:
        sites = {site.linears[0]: site for site in ctx.layout.fold_sites}
        absmax: dict = {}  # per lead linear, over the current batch (EMA) or the whole set
        averaged: dict = {}

        def observe(name, x, pos):
            m = ctx.non_sink(sites[name], x, pos).abs().amax(dim=0).float()
            absmax[name] = m if name not in absmax else torch.maximum(absmax[name], m)

        def batch_done():
            for name, site in sites.items():
                averaged[name] = ctx.average(averaged.get(name), self._scales(ctx, site, absmax[name]))
            absmax.clear()

        ctx.fp_sweep("smoothquant", observe, sites, on_batch=batch_done if ctx.plan.ema else None)
        summary = {}
        for i, (name, site) in enumerate(sites.items()):
            s = averaged[name] if ctx.plan.ema else self._scales(ctx, site, absmax[name])
            ctx.fold_scale(site, s)
            summary[name] = {"min": float(s.min()), "max": float(s.max())}
            ctx.layer_done("smoothquant", site, i)
        return summary

    def _scales(self, ctx, site, act_absmax):
        return smoothquant_scales(act_absmax, ctx.lead(site).weight, self.config.alpha)
