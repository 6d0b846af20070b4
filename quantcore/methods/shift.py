"""The symmetric shift (OS+-style per-channel centring, reference §5.3).

From each fold site's per-channel activation quantizer (delta_i, zp_i), p_i = (2^(b-1) - 1 - zp_i) delta_i:
the site's linears see x - p (bias += W p) and the producer's shift absorbs -p, which puts every
channel's grid at zero point 2^(b-1) - 1, i.e. a range about [-(2^(b-1)-1) delta_i, 2^(b-1) delta_i]
centred on zero. GPS weighs channels by their raw second moments, so it runs on centred channels.
"""

from __future__ import annotations

from typing import Literal

from quantcore.deferred import deferred
from quantcore.methods.registry import PassConfig, PassHandler, register_pass

quantizer = deferred("quantcore.quant.quantizer")


class Shift(PassConfig):
    kind: Literal["shift"] = "shift"


def symmetric_shift(scale, zero_point, n_bits: int):
    """p_i = (2^(b-1) - 1 - zp_i) * delta_i, float32."""
    quantizer.check_bits(n_bits)
    return (2 ** (n_bits - 1) - 1 - zero_point.float()) * scale.float()


def shift_site(ctx, site) -> float:
    """Centre one site's input with its (already calibrated) per-channel quantizer; returns max |p|."""
    q = ctx.lead(site).input_quantizer
    p = symmetric_shift(q.scale, q.zero_point, ctx.a_bits)
    ctx.fold_shift(site, p)
    return float(p.abs().max())


@register_pass(Shift)
class ShiftPass(PassHandler):
    def run(self, ctx) -> dict:
        ctx.channel_ranges("shift")
        summary = {}
        for i, site in enumerate(ctx.layout.fold_sites):
            summary[site.linears[0]] = {"abs_max": shift_site(ctx, site)}
            ctx.layer_done("shift", site, i)
        return summary
