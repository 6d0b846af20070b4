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


# The K/V cache of an attention layer lives in its `k_cache` / `v_cache` (B, H, L, D); with a
# `kv_codec` (quantcore.quant.real.KVCodec) they hold 8-bit codes instead of the model dtype, and with a
# `fused_attention` (quantcore.quant.real.FusedAttention) cached decoding reads them in one GPU kernel.


def allocate_kv_caches(attentions, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    for attention in attentions:
        stored = torch.uint8 if attention.kv_codec is not None else dtype
        attention.k_cache = torch.zeros(shape, dtype=stored, device=device)
        attention.v_cache = torch.zeros(shape, dtype=stored, device=device)


def free_kv_caches(attentions) -> None:
    for attention in attentions:
        attention.k_cache = attention.v_cache = None


def write_kv(attention: nn.Module, b: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store k, v (b, H, T, D) at positions `pos` of the layer's cache."""
    codec = attention.kv_codec
    attention.k_cache[:b, :, pos] = k if codec is None else codec.encode(k, 0)
    attention.v_cache[:b, :, pos] = v if codec is None else codec.encode(v, 1)


def read_kv(
    attention: nn.Module, b: int, length: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `length` cached positions of K and V, in `dtype`."""
    k, v = attention.k_cache[:b, :, :length], attention.v_cache[:b, :, :length]
    codec = attention.kv_codec
    return (k, v) if codec is None else (codec.decode(k, 0, dtype), codec.decode(v, 1, dtype))


def fused_attention(
    attention: nn.Module, q: torch.Tensor, b: int, pos: torch.Tensor, length: int, causal: bool, scale: float
) -> torch.Tensor:
    """softmax(scale q K^T) V (b, H, T, D) over the first `length` cached positions, in the layer's
    fused kernel; `causal` hides the keys after each query's position in `pos`."""
    return attention.fused_attention(
        q, attention.k_cache[:b], attention.v_cache[:b], pos, length, causal, scale
    )
