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


class KVCodec:
    """8-bit storage for a layer's K/V cache, from the attention matmuls' own per-tensor quantizers.

    The cache then holds the codes q = clamp(round(x / s) + z, 0, 2^b - 1) (uint8) instead of x, and reads
    back (q - z) s: exactly what the matmul's quantizer makes of x anyway (it re-quantizes that to the
    same codes), at a half (bf16) or a quarter (fp32) of the bytes. Attached by
    `quantcore.quant.real.to_real`; a plain object, so the quantizers stay owned by their matmuls.
    """

    def __init__(self, k_quantizer: nn.Module, v_quantizer: nn.Module):
        self.quantizers = (k_quantizer, v_quantizer)

    def encode(self, x: torch.Tensor, which: int) -> torch.Tensor:
        q = self.quantizers[which]
        codes = torch.round(x.float() / q.scale) + q.zero_point.float()
        return torch.clamp(codes, 0, 2**q.n_bits - 1).to(torch.uint8)

    def decode(self, codes: torch.Tensor, which: int, dtype: torch.dtype) -> torch.Tensor:
        q = self.quantizers[which]
        return ((codes.float() - q.zero_point.float()) * q.scale).to(dtype)


def cache_dtype(attention: nn.Module, dtype: torch.dtype) -> torch.dtype:
    """What `setup_caches` allocates for this attention layer: its codes' uint8, or the model dtype."""
    return torch.uint8 if getattr(attention, "kv_codec", None) is not None else dtype


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
