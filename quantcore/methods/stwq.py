"""Static Token-Wise Quantization: activation parameters that depend on the token position.

Token positions are fixed in an ARVG sequence and the per-position distributions are the same across
samples, so each position group gets its own static (delta, z), calibrated offline and looked up by
absolute position at run time. "groups" uses the family's groups (sink tokens alone, the rest shared;
VAR: one group per scale), "per_position" one entry per position. The LM head stays per-tensor.
"""

from __future__ import annotations

from typing import Literal

from quantcore.methods.registry import PassConfig, PassHandler, register_pass


class STWQ(PassConfig):
    kind: Literal["stwq"] = "stwq"
    role = "granularity"
    mode: Literal["groups", "per_position"] = "groups"


@register_pass(STWQ)
class STWQPass(PassHandler):
    def act_quantizer(self, ctx, linear: str):
        table = ctx.layout.groups_for(linear, per_position=self.config.mode == "per_position")
        if int(table.max()) == 0:
            return None  # one group (VAR's AdaLN condition has no token axis): per-tensor
        return ctx.act_quantizer("group", group_of_position=table)
