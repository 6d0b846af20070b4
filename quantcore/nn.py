"""The two building blocks every model uses where quantization can later step in.

Models call `Linear(x, pos)` and `MatMul(a, b)` instead of `F.linear` and `@`, so that quantized
replacements can be swapped in module by module. `pos` holds the absolute sequence positions of the
tokens along dim -2 of `x` (a LongTensor of shape (T,)); a static token-wise quantizer picks its
parameters from it. Positions are always passed down explicitly by the model's forward.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Linear(nn.Linear):
    """`nn.Linear` with the official parameter names whose forward also accepts token positions."""

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MatMul(nn.Module):
    """A parameter-free `a @ b`, so the two attention matmuls can be quantized."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b
