import torch
from torch import nn

from quantcore.nn import Linear
from quantcore.quant.layout import AdaLNRows, FoldSite, fold_scale, fold_shift


class ToyAdaLNBlock(nn.Module):
    """x -> LN(x) * (one + scale) + shift -> fc, with VAR's chunk order [g1, g2, sc1, sc2, sh1, sh2]."""

    def __init__(self, c=8, d=6):
        super().__init__()
        self.ada_lin = Linear(d, 6 * c)
        self.fc = Linear(c, 5)
        self.register_buffer("one", None)

    def forward(self, x, cond):
        chunks = self.ada_lin(cond).chunk(6, dim=-1)
        scale, shift = chunks[2], chunks[4]
        one = 1.0 if self.one is None else self.one
        return self.fc(nn.functional.layer_norm(x, x.shape[-1:]) * (one + scale) + shift)


def test_adaln_row_folding_is_exact():
    torch.manual_seed(0)
    block = ToyAdaLNBlock().double()
    x, cond = torch.randn(3, 4, 8, dtype=torch.double), torch.randn(3, 1, 6, dtype=torch.double)
    ref = block(x, cond)
    site = FoldSite(AdaLNRows("ada_lin", n_chunks=6, scale=2, shift=4, one="one"), ("fc",))
    s = torch.rand(8, dtype=torch.double) * 3 + 0.2
    p = torch.randn(8, dtype=torch.double)
    fold_scale(block, site, s)
    fold_shift(block, site, p)
    assert block.one is not None and "one" in block.state_dict()  # the "1 +" became the vector 1/s
    torch.testing.assert_close(block(x, cond), ref, rtol=1e-10, atol=1e-10)
    # gamma rows are untouched; the input the linear sees really is x / s - p
    seen = {}
    block.fc.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    block(x, cond)
    torch.manual_seed(0)
    fresh = ToyAdaLNBlock().double()  # same init as `block` before folding
    fresh.fc.register_forward_pre_hook(lambda m, a: seen.setdefault("orig", a[0]))
    fresh(x, cond)
    torch.testing.assert_close(seen["x"], seen["orig"] / s - p)
