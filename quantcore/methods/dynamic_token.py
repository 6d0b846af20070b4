"""Dynamic per-token activation ranges (the DTWQ ablation of the paper): nothing static, each token's
min/max is taken at run time. The LM head stays per-tensor."""

from __future__ import annotations

from typing import Literal

from quantcore.methods.registry import PassConfig, PassHandler, register_pass


class DynamicToken(PassConfig):
    kind: Literal["dynamic_token"] = "dynamic_token"
    role = "granularity"


@register_pass(DynamicToken)
class DynamicTokenPass(PassHandler):
    def act_quantizer(self, ctx, linear: str):
        return ctx.act_quantizer("dynamic_token")
