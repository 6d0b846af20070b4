"""Real low-bit execution of a calibrated model: the engine's own parameters through integer/fp8 GEMMs.

`to_real(model)` swaps every eligible `QuantLinear` for a `RealQuantLinear` built from it (no second
calibration) and returns, per layer, the path it runs:

    "int8-cpu" / "int8-gpu"  W(<=8)A(<=8) static or per-token acts: int8 x int8 -> int32 `torch._int_mm`,
                             zero-points handled exactly in integer arithmetic (bit-exact codes; the
                             only difference from simulation is the final float rounding); on the GPU,
                             decode-sized calls run the fused Triton kernel `quantcore::a8_linear`
                             (the same integer products, fp32-accumulated, in one launch)
    "fp8-gpu"                W8A8 through e4m3 `torch._scaled_mm` with row-wise scales derived from the
                             calibrated ranges (a different 8-bit grid: close to, not equal to, int8)
    "w8-gpu" / "w4-gpu"      weight-only: int8 / packed int4 codes, fused dequantize-GEMM (Triton)
    "dequantized"            the simulated numerics with only the dequantized weight resident (the
                             speed planner's choice where no low-bit kernel beats the model-dtype GEMM)
    "simulated"              everything else, with the reason

The integer identity (a = q_x - o_x and b = q_w - o_w are int8, z' = z - o the shifted zero-points):

    sum_k (q_x - z_x)(q_w - z_w) = sum_k a b - z_x' (sum_k b - K z_w') - z_w' sum_k a

`sum_k b - K z_w'` and z_w' are precomputed per output row; `sum_k a` is one row reduction per call.

The objective of `to_real(model, objective=...)` chooses among a layer's candidates: the real paths
its quantizers allow (`plan_layer`'s path, or both int8-gpu and fp8-gpu where W8A8 "auto" may take
fp8, both w4-gpu and w8-gpu for <= 4-bit weight-only layers) and, for "speed", "dequantized" (fake-
quantized input, the model-dtype GEMM on the dequantized weight: the simulated layer's numerics and a
bf16 layer's memory). None: the choice described above. "speed" (CUDA only): every candidate timed at
`tune_rows` input rows and the fastest kept, so no layer runs slower than its dequantized GEMM (a tie
stays dequantized). "memory": no timing, the fewest resident weight bits (w4-gpu < the 8-bit paths);
ties go to the default path, int8-gpu for "auto".
Each layer's entry records the objective and, for "speed", `timings_ms` per candidate and `rows`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from quantcore.errors import ConfigError
from quantcore.quant.modules import QuantLinear, QuantMatMul, iter_quant_modules, swap_module
from quantcore.quant.quantizer import (
    FusedOnGPU,
    LogSqrt2Quantizer,
    UniformQuantizer,
    dequantize_codes,
    quantize_codes,
)

PATHS = ("int8-cpu", "int8-gpu", "fp8-gpu", "w8-gpu", "w4-gpu", "dequantized", "simulated")
W8A8_CHOICES = ("auto", "int8", "fp8")
OBJECTIVES = (None, "speed", "memory")
# Resident bits per weight of each real path (sub-8-bit codes run as int8 except on w4-gpu); every one is
# below the float weight a simulated layer keeps, so "memory" never picks "simulated" over a real path.
WEIGHT_BITS = {"int8-cpu": 8, "int8-gpu": 8, "fp8-gpu": 8, "w8-gpu": 8, "w4-gpu": 4}
# plan_layer's paths that leave a choice -> the real candidates, the default first (it wins ties).
ALTERNATIVES = {"auto": ("int8-gpu", "fp8-gpu"), "w4-gpu": ("w4-gpu", "w8-gpu")}
E4M3_MAX = 448.0
# Up to this many rows a GPU int8 layer runs the fused Triton kernel (quantize + GEMM + epilogue in one
# launch, bf16 tensor cores on exact integer operands): decode steps are bound by weight bytes and
# launches, not MACs. More rows go to the int8 tensor cores through torch._int_mm.
FUSED_DECODE_ROWS = 64
STATIC_OR_TOKEN = ("tensor", "group", "dynamic_token")


# ---------------------------------------------------------------------------------------------------
# Packing of sub-byte weight codes (storage form; compute unpacks or reads nibbles in the kernel)
# ---------------------------------------------------------------------------------------------------


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 (N, K) codes in 0..2^bits-1 -> packed uint8 rows.

    4 bits: (N, K/2), byte j = code[j] | code[j + K/2] << 4 (the layout the Triton kernel reads);
    6 bits: (N, 3K/4), every 4 codes -> 3 bytes, little-endian within the 24-bit word.
    """
    n, k = codes.shape
    c = codes.to(torch.uint8)
    if bits == 4:
        if k % 2:
            raise ConfigError(f"4-bit packing needs an even in_features, got {k}")
        return c[:, : k // 2] | (c[:, k // 2 :] << 4)
    if bits == 6:
        if k % 4:
            raise ConfigError(f"6-bit packing needs in_features divisible by 4, got {k}")
        w = c.view(n, k // 4, 4).to(torch.int32)
        word = w[..., 0] | (w[..., 1] << 6) | (w[..., 2] << 12) | (w[..., 3] << 18)
        return (
            torch.stack([word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF], -1)
            .to(torch.uint8)
            .view(n, -1)
        )
    raise ConfigError(f"packing is defined for 4 and 6 bits, got {bits}")


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 (N, K) codes."""
    if bits == 4:
        return torch.cat([packed & 0xF, packed >> 4], dim=1)[:, :k]
    if bits == 6:
        b = packed.view(packed.shape[0], -1, 3).to(torch.int32)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
        codes = torch.stack([(word >> s) & 0x3F for s in (0, 6, 12, 18)], -1)
        return codes.to(torch.uint8).view(packed.shape[0], -1)[:, :k]
    raise ConfigError(f"packing is defined for 4 and 6 bits, got {bits}")


def dequantized_weight(ql: QuantLinear) -> torch.Tensor:
    """(q_w - z) s in fp32: the weight the simulated path multiplies by (ql.quantized_weight() before its
    cast to the model dtype)."""
    wq = ql.weight_quantizer
    return dequantize_codes(weight_codes(ql), wq.scale[:, None], wq.zero_point.float()[:, None])


def weight_codes(ql: QuantLinear) -> torch.Tensor:
    """The integer weight codes q_w in 0..2^b-1 (int32, on the weight's device): the codes an artifact
    stored while the weight is the loaded one, else the weight rounded exactly as the simulated path
    rounds it."""
    stored = ql.stored_codes()
    if stored is not None:
        return stored.to(ql.weight.device, torch.int32)
    wq = ql.weight_quantizer
    w = ql.weight.detach().float()
    return quantize_codes(w, wq.scale[:, None], wq.zero_point.float()[:, None], wq.n_bits).to(torch.int32)


# ---------------------------------------------------------------------------------------------------
# The elementwise work around the GEMMs, fused on the GPU
# ---------------------------------------------------------------------------------------------------


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    return (y if bias is None else y + bias).to(dtype)


def _int8_codes(x2: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int, offset: int):
    """Activation codes centred into int8 and their row sums (the zero-point correction needs them)."""
    a = (quantize_codes(x2.float(), scale[:, None], zp[:, None], bits) - offset).to(torch.int8)
    return a, a.sum(1, dtype=torch.int32)


def _int8_epilogue(acc, x_zp, rowsum, w_colterm, w_zp, scale, w_scale, bias, dtype: torch.dtype):
    """int32 sums -> (q_x - z_x)(q_w - z_w) summed, times both scales, plus bias, in the output dtype."""
    acc = acc - x_zp[:, None] * w_colterm - rowsum[:, None] * w_zp
    return _add_bias(acc.float() * (scale[:, None] * w_scale), bias, dtype)


def _fp8_codes(x2: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmax: int):
    """Each row clipped to its calibrated range, scaled so the range's larger end is e4m3's 448."""
    lo, hi = (-zp * scale)[:, None], ((qmax - zp) * scale)[:, None]
    s8 = (torch.maximum(lo.abs(), hi.abs()) / E4M3_MAX).clamp(min=1e-12)
    return (torch.clamp(x2.float(), lo, hi) / s8).to(torch.float8_e4m3fn), s8


def _kv_encode(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
    return quantize_codes(x.float(), scale, zp, bits).to(torch.uint8)


def _kv_decode(
    codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    return dequantize_codes(codes, scale, zp).to(dtype)


int8_codes = FusedOnGPU(_int8_codes)
int8_epilogue = FusedOnGPU(_int8_epilogue)
fp8_codes = FusedOnGPU(_fp8_codes)
add_bias = FusedOnGPU(_add_bias)
kv_encode = FusedOnGPU(_kv_encode)
kv_decode = FusedOnGPU(_kv_decode)


# ---------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------


class RealQuantLinear(nn.Module):
    """Shared state of the real paths: bias, per-row weight scale, and the calibrated input quantizer.

    The input quantizer is kept as is (a submodule): its `params_for` gives the same (scale, zero-point)
    per token that the simulated path uses, for per-tensor, STWQ group tables (indexed by `pos`) and
    dynamic per-token parameters alike.
    """

    path = "simulated"

    def __init__(self, ql: QuantLinear):
        super().__init__()
        self.in_features, self.out_features = ql.in_features, ql.out_features
        self.w_bits = ql.weight_quantizer.n_bits
        self.bias = None if ql.bias is None else nn.Parameter(ql.bias.detach().clone(), requires_grad=False)
        self.register_buffer("w_scale", ql.weight_quantizer.scale.detach().float().clone())
        self.input_quantizer = ql.input_quantizer
        # Sub-byte codes are stored packed; this is their stored size (compute may keep them wider).
        packed_row = -(-self.in_features * self.w_bits // 8)
        self.packed_bytes = self.out_features * packed_row if self.w_bits in (4, 6) else None

    @classmethod
    def from_quant_linear(
        cls, ql: QuantLinear, path: str, device: torch.device | None = None
    ) -> RealQuantLinear:
        """The module of `path` for `ql`, on `device` (default: ql's)."""
        kinds = {"int8-cpu": Int8Linear, "int8-gpu": Int8Linear, "fp8-gpu": Fp8Linear}
        kinds |= {"w8-gpu": WeightOnlyLinear, "w4-gpu": WeightOnlyLinear, "dequantized": DequantizedLinear}
        if path not in kinds:
            raise ConfigError(f"no real module for path {path!r}; real paths are {sorted(kinds)}")
        module = kinds[path](ql, path)
        return module.to(ql.weight.device if device is None else device)

    def _act_params(self, x: torch.Tensor, pos: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row (scale, zero-point) of the flattened (M, K) input, as float (M,) tensors (dynamic
        per-token ranges read x's min/max, which any float dtype holds exactly)."""
        scale, zp = self.input_quantizer.params_for(x, pos)
        rows = x.shape[:-1] + (1,)
        return scale.expand(rows).reshape(-1), zp.expand(rows).reshape(-1)

    def resident_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers()) + sum(
            p.numel() * p.element_size() for p in self.parameters()
        )

    def describe_execution(self) -> dict:
        out = {"path": self.path, "w_bits": self.w_bits, "resident_bytes": self.resident_bytes()}
        if self.packed_bytes is not None:
            out["packed_bytes"] = self.packed_bytes
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, path={self.path}, W{self.w_bits}"


class Int8Linear(RealQuantLinear):
    """W(<=8)A(<=8) through int8 x int8 -> int32, exact in the integer codes."""

    def __init__(self, ql: QuantLinear, path: str):
        super().__init__(ql)
        self.path = path
        aq = ql.input_quantizer
        self.a_bits = aq.n_bits
        # Centre unsigned codes on zero so they fit int8 (any offset works; it cancels exactly).
        self.a_offset = 2 ** (aq.n_bits - 1)
        w_offset = 2 ** (self.w_bits - 1)
        b = weight_codes(ql) - w_offset  # (N, K) in int8 range
        w_zp = ql.weight_quantizer.zero_point.to(torch.int32) - w_offset
        k = self.in_features
        # cuBLASLt wants K and N multiples of 8: zero columns add nothing to any sum; extra rows are cut.
        self.k_pad = (-k) % 8 if path == "int8-gpu" else 0
        self.n_pad = (-self.out_features) % 8 if path == "int8-gpu" else 0
        self.register_buffer("qweight", F.pad(b, (0, self.k_pad, 0, self.n_pad)).to(torch.int8))
        self.register_buffer("w_zp", w_zp)
        self.register_buffer("w_colterm", b.sum(1, dtype=torch.int32) - k * w_zp)
        if path == "int8-gpu":  # the fused decode kernel reads the zero-points as float
            import quantcore.kernels.wo_gemm  # noqa: F401  (registers quantcore::a8_linear)

            self.register_buffer("w_zp_float", w_zp.float())

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        scale, zp = self._act_params(x, pos)
        x2 = x.reshape(-1, self.in_features)
        if self.path == "int8-gpu" and x2.shape[0] <= FUSED_DECODE_ROWS:  # quantizes x in the kernel
            y = torch.ops.quantcore.a8_linear(
                x2,
                scale,
                zp,
                self.qweight,
                self.w_zp_float,
                self.w_scale,
                self.bias,
                self.out_features,
                self.a_bits,
            )
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        a, rowsum = int8_codes(x2, scale, zp, self.a_bits, self.a_offset)
        m = a.shape[0]
        acc = torch._int_mm(self._pad_k(a), self.qweight.t())[:m, : self.out_features]
        x_zp = (zp - self.a_offset).to(torch.int32)
        y = int8_epilogue(
            acc, x_zp, rowsum, self.w_colterm, self.w_zp, scale, self.w_scale, self.bias, x.dtype
        )
        return y.reshape(*x.shape[:-1], self.out_features)

    def _pad_k(self, a: torch.Tensor) -> torch.Tensor:
        """K padded for cuBLASLt (GPU calls here have more rows than its minimum of 16)."""
        return F.pad(a, (0, self.k_pad)) if self.k_pad else a

    def describe_execution(self) -> dict:
        out = super().describe_execution()
        out["a_bits"] = self.a_bits
        out["granularity"] = self.input_quantizer.granularity
        if self.path == "int8-gpu":
            out["padding"] = f"_int_mm calls: K+{self.k_pad}, N+{self.n_pad}"
            out["kernels"] = f"<= {FUSED_DECODE_ROWS} rows: fused Triton a8_linear; more: torch._int_mm"
        if self.w_bits < 8:
            out["note"] = f"{self.w_bits}-bit codes resident as int8 for the 8-bit GEMM"
        return out


class Fp8Linear(RealQuantLinear):
    """W8A8 through e4m3 `torch._scaled_mm`, row-wise scales (Hopper/Ada).

    The activation is clipped to the calibrated range [(0 - z) s, (2^b - 1 - z) s] of its token and
    scaled so that range's larger end maps to 448; the weight is the engine's dequantized weight,
    re-encoded per row. e4m3 keeps 3 mantissa bits, so this is near, not equal to, the int8 result.
    """

    def __init__(self, ql: QuantLinear, path: str):
        super().__init__(ql)
        self.path = path
        aq = ql.input_quantizer
        self.a_bits, self.a_qmax = aq.n_bits, 2**aq.n_bits - 1
        w_hat = dequantized_weight(ql)
        row_scale = (w_hat.abs().amax(1) / E4M3_MAX).clamp(min=1e-12)
        self.register_buffer("qweight", (w_hat / row_scale[:, None]).to(torch.float8_e4m3fn))
        self.register_buffer("w8_scale", row_scale[None, :].contiguous())

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        scale, zp = self._act_params(x, pos)
        a, s8 = fp8_codes(x.reshape(-1, self.in_features), scale, zp, self.a_qmax)
        y = torch._scaled_mm(a, self.qweight.t(), s8, self.w8_scale, out_dtype=torch.bfloat16)
        return add_bias(y, self.bias, x.dtype).reshape(*x.shape[:-1], self.out_features)

    def describe_execution(self) -> dict:
        out = super().describe_execution()
        out["a_bits"] = self.a_bits
        out["granularity"] = self.input_quantizer.granularity
        out["note"] = "e4m3 re-encoding of the calibrated ranges: close to the int8 result, not equal"
        return out


class WeightOnlyLinear(RealQuantLinear):
    """Weight-only int8 or packed int4 codes through the fused dequantize-GEMM `quantcore::wo_linear`."""

    def __init__(self, ql: QuantLinear, path: str):
        import quantcore.kernels.wo_gemm  # noqa: F401  (registers the op; needs Triton and CUDA)

        super().__init__(ql)
        self.path = path
        codes = weight_codes(ql)
        zp = ql.weight_quantizer.zero_point.to(torch.int32)
        if path == "w4-gpu":
            if self.w_bits > 4 or self.in_features % 2:
                raise ConfigError(f"w4-gpu needs <= 4-bit weights and an even in_features, got {ql!r}")
            self.kernel_bits = 4
            self.register_buffer("qweight", pack_codes(codes.to(torch.uint8), 4))
        else:
            self.kernel_bits = 8
            codes, zp = codes - 128, zp - 128  # centred into int8; q - z is unchanged
            self.register_buffer("qweight", codes.to(torch.int8))
        self.register_buffer("w_zp", zp.float())

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.ops.quantcore.wo_linear(
            x, self.qweight, self.w_zp, self.w_scale, self.bias, self.kernel_bits
        )
        return y.to(x.dtype)

    def describe_execution(self) -> dict:
        out = super().describe_execution()
        if self.w_bits == 6:
            out["note"] = "6-bit codes resident as int8 (the 8-bit kernel); packed_bytes is the stored size"
        return out


class DequantizedLinear(RealQuantLinear):
    """The simulated layer's numerics with only its dequantized weight resident: the model-dtype GEMM
    on (q - z) s and the input fake-quantized by its own quantizer. What the planner keeps where no
    low-bit kernel beats that GEMM (a QuantLinear would keep the float weight and its cached copy)."""

    path = "dequantized"

    def __init__(self, ql: QuantLinear, path: str):
        super().__init__(ql)
        self.register_buffer("weight", dequantized_weight(ql).to(ql.weight.dtype))  # = ql.quantized_weight()

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(self.input_quantizer(x, pos), self.weight, self.bias)


class KVCodec:
    """8-bit storage for a layer's K/V cache, from the attention matmuls' own per-tensor quantizers.

    The cache then holds the codes q = clamp(round(x / s) + z, 0, 2^b - 1) (uint8) instead of x, and reads
    back (q - z) s: exactly what the matmul's quantizer makes of x anyway (it re-quantizes that to the
    same codes), at a half (bf16) or a quarter (fp32) of the bytes. Attached by `to_real`; a plain
    object, so the quantizers stay owned by their matmuls.
    """

    def __init__(self, k_quantizer: nn.Module, v_quantizer: nn.Module):
        self.quantizers = (k_quantizer, v_quantizer)

    def encode(self, x: torch.Tensor, which: int) -> torch.Tensor:
        q = self.quantizers[which]
        return kv_encode(x, q.scale, q.zero_point.float(), q.n_bits)

    def decode(self, codes: torch.Tensor, which: int, dtype: torch.dtype) -> torch.Tensor:
        q = self.quantizers[which]
        return kv_decode(codes, q.scale, q.zero_point.float(), dtype)


@dataclass
class FusedAttention:
    """A layer's attention over its K/V cache in one kernel (`quantcore::cached_attention`), with the
    recipe's numerics: the query through its own quantizer, K/V read as the cache's 8-bit codes (or in the
    model dtype where the layer's matmuls are not quantized), the softmax output fake-quantized in the
    kernel where the recipe quantizes it. Attached by `install_fused_attention`; a plain object, so the
    quantizers stay owned by their matmuls. The models call it for cached decoding only.
    """

    q_quantizer: nn.Module | None
    kv_params: list[float]  # s_k, z_k, s_v, z_v (unused for a cache in the model dtype)
    p_kind: int  # quantcore.kernels.attention.P_*
    p_params: list[float]

    def __call__(self, q, k_cache, v_cache, pos, kv_len: int, causal: bool, sm_scale: float) -> torch.Tensor:
        """(b, H, T, D) for queries q at positions `pos` over the first `kv_len` cached keys."""
        if self.q_quantizer is not None:
            q = self.q_quantizer(q)
        return torch.ops.quantcore.cached_attention(
            q, k_cache, v_cache, pos, kv_len, causal, sm_scale, self.kv_params, self.p_kind, self.p_params
        )


def _quantizer_on(q) -> bool:
    return q is not None and q.mode != "off"


def _probability_params(q) -> tuple[int, list[float], str]:
    """(kind, params, reason) of a softmax-output quantizer for the kernel; reason non-empty = not fusable."""
    from quantcore.kernels.attention import P_LOG_SQRT2, P_NONE, P_UNIFORM

    if not _quantizer_on(q):
        return P_NONE, [], ""
    if q.mode != "on" or not bool(q.initialized):
        return P_NONE, [], f"the probability quantizer is in mode {q.mode!r}"
    if q.passthrough is not None and q.passthrough.numel():
        return P_NONE, [], "sink rows of the probabilities stay in FP"
    if isinstance(q, LogSqrt2Quantizer):
        return P_LOG_SQRT2, [float(q.scale), 0.0, float(2**q.n_bits)], ""
    if isinstance(q, UniformQuantizer) and q.granularity == "tensor":
        return P_UNIFORM, [float(q.scale), float(q.zero_point), float(2**q.n_bits - 1)], ""
    return P_NONE, [], "the probability quantizer is not per-tensor uniform or log-sqrt2"


def fused_attention_for(attention: nn.Module, device: torch.device) -> tuple[FusedAttention | None, str]:
    """The fused cached-attention kernel for one attention layer, or None and why not."""
    if device.type != "cuda" or not _triton_available():
        return None, "the fused attention kernel needs CUDA and Triton"
    head_dim = getattr(attention, "head_dim", 0)
    if not 0 < head_dim <= 256:
        return None, f"head_dim {head_dim} is not in 1..256"
    qk, pv = attention.matmul_qk, attention.matmul_pv
    quantized = [isinstance(m, QuantMatMul) for m in (qk, pv)]
    if not any(quantized):
        return FusedAttention(None, [1.0, 0.0, 1.0, 0.0], 0, []), ""
    if not all(quantized):
        return None, "only one of the attention matmuls is quantized"
    if attention.kv_codec is None:
        return None, "K/V are not cached as 8-bit codes"
    p_kind, p_params, reason = _probability_params(pv.a_quantizer)
    if reason:
        return None, reason
    k, v = attention.kv_codec.quantizers
    kv_params = [float(k.scale), float(k.zero_point), float(v.scale), float(v.zero_point)]
    return FusedAttention(
        qk.a_quantizer if _quantizer_on(qk.a_quantizer) else None, kv_params, p_kind, p_params
    ), ""


def install_fused_attention(model: nn.Module, device: torch.device | None = None) -> dict[str, str]:
    """Give every cached attention layer of `model` the fused kernel where it applies; {layer: reason}
    for the layers that keep the matmul path ("" = fused). Also for unquantized models."""
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    if device.type == "cuda" and _triton_available():
        import quantcore.kernels.attention  # noqa: F401  (registers quantcore::cached_attention)
    reasons = {}
    for name, module in model.named_modules():
        if hasattr(module, "fused_attention"):
            module.fused_attention, reasons[name] = fused_attention_for(module, device)
    return reasons


# ---------------------------------------------------------------------------------------------------
# Planning and conversion
# ---------------------------------------------------------------------------------------------------


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def plan_layer(ql: QuantLinear, device: torch.device, w8a8: str = "auto") -> tuple[str, str]:
    """(path, reason) for one QuantLinear on `device`; "auto" W8A8 GPU layers are decided by timing."""
    wq, aq = ql.weight_quantizer, ql.input_quantizer
    if wq.mode != "on" or not bool(wq.initialized):
        return "simulated", "weights are not quantized (weight quantizer off)"
    cuda = device.type == "cuda"
    if aq.mode == "off":
        if not cuda:
            return "simulated", "weight-only layer: the CPU path needs quantized activations"
        if not _triton_available():
            return "simulated", "weight-only layer: Triton is not importable for the dequantize-GEMM"
        if wq.n_bits <= 4 and ql.in_features % 2 == 0:
            return "w4-gpu", ""
        return "w8-gpu", ""
    if aq.mode != "on":
        return "simulated", f"input quantizer is in mode {aq.mode!r}"
    if not isinstance(aq, UniformQuantizer):
        return "simulated", "log-sqrt2 input quantizer has no integer GEMM form"
    if aq.granularity not in STATIC_OR_TOKEN:
        return "simulated", f"per-{aq.granularity} input scales cannot be factored out of a GEMM"
    if aq.passthrough is not None and aq.passthrough.numel():
        return "simulated", "sink positions pass through in FP (mixed precision inside one GEMM)"
    if not cuda:
        return "int8-cpu", ""
    fp8_ok = (
        torch.cuda.get_device_capability(device) >= (8, 9)
        and wq.n_bits == 8
        and aq.n_bits == 8
        and ql.in_features % 16 == 0
        and ql.out_features % 16 == 0
    )
    if w8a8 == "fp8" and fp8_ok:
        return "fp8-gpu", ""
    if w8a8 == "auto" and fp8_ok:
        return "auto", ""
    return "int8-gpu", "" if w8a8 != "fp8" else "fp8 needs sm_89+, W8A8 and K, N multiples of 16"


def time_ms(fn: Callable[[], object], reps: int = 20) -> float:
    """GPU milliseconds per call of `fn`, CUDA events over `reps` calls after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _layer_timings(
    ql: QuantLinear, paths: tuple[str, ...], rows: int, dtype: torch.dtype, device: torch.device, cache: dict
) -> dict[str, float]:
    """ms per call of each path's module for this layer at `rows` input rows on `device`, timed once per
    (path, K, N, rows)."""
    shape = (ql.in_features, ql.out_features, rows)
    missing = [path for path in paths if (path, *shape) not in cache]
    if missing:
        # (1, rows, K): per-position tables see one position repeated
        x = torch.randn(rows, ql.in_features, device=device, dtype=dtype)[None]
        pos = torch.zeros(1, dtype=torch.long, device=x.device).expand(rows)
        for path in missing:
            module = RealQuantLinear.from_quant_linear(ql, path, device)
            cache[(path, *shape)] = time_ms(lambda m=module: m(x, pos))
    return {path: cache[(path, *shape)] for path in paths}


def _pick_w8a8(
    ql: QuantLinear, rows: int, dtype: torch.dtype, device: torch.device, cache: dict
) -> tuple[str, str]:
    """The faster of the int8 and fp8 modules for this layer's (K, N) at `rows` input rows."""
    times = _layer_timings(ql, ALTERNATIVES["auto"], rows, dtype, device, cache)
    best = min(times, key=times.get)
    return best, f"timed at {rows} rows: int8 {times['int8-gpu']:.4f} ms, fp8 {times['fp8-gpu']:.4f} ms"


def _fastest(
    ql: QuantLinear,
    default: str,
    reason: str,
    rows: int,
    dtype: torch.dtype,
    device: torch.device,
    cache: dict,
) -> tuple[str, str, dict]:
    """Objective "speed": (path, reason, record) of the fastest candidate, "dequantized" among them."""
    candidates = ("dequantized", *ALTERNATIVES.get(default, (default,)))  # first: it wins a tie
    times = _layer_timings(ql, candidates, rows, dtype, device, cache)
    best = min(candidates, key=times.get)
    if best == "dequantized":
        dtype_name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, dtype)
        reason = f"no low-bit kernel faster than the dequantized {dtype_name} GEMM at {rows} rows"
    return best, reason, {"timings_ms": {p: round(t, 5) for p, t in times.items()}, "rows": rows}


def _replayed(name: str, default: str, reason: str, entry: dict) -> tuple[str, str, dict]:
    """(path, reason, record) of a recorded plan's entry, checked against the layer's candidates here."""
    path = entry.get("path")
    candidates = ("simulated",)
    if default != "simulated":
        candidates = ("dequantized", *ALTERNATIVES.get(default, (default,)))
    if path not in candidates:
        raise ConfigError(
            f"the recorded plan runs {name} on {path!r}, which this device cannot run for it (candidates: "
            f"{', '.join(candidates)}); load with an objective to plan again"
        )
    kept = {k: entry[k] for k in ("objective", "timings_ms", "rows") if k in entry}
    return path, entry.get("reason", reason if path == "simulated" else ""), kept | {"planned": "recorded"}


def _smallest(default: str) -> str:
    """Objective "memory": the candidate real path with the fewest resident weight bits."""
    return min(ALTERNATIVES.get(default, (default,)), key=WEIGHT_BITS.get)


@torch.no_grad()
def to_real(
    model: nn.Module,
    device: str | torch.device | None = None,
    *,
    w8a8: str = "auto",
    tune_rows: int = 64,
    objective: str | None = None,
    recorded: dict[str, dict] | None = None,
) -> dict[str, dict]:
    """Swap every eligible QuantLinear of `model` for its real module, in place; returns the execution map.

    The real modules are built on `device` (default: the model's), from the layers' weight codes
    (`weight_codes`: an artifact's stored codes where its loader kept them). A model still on the CPU
    converts for a GPU and is moved after (`model.to(device)`), so the float weight of a layer that runs
    real is never copied to the GPU; the attention layers' kernels are chosen for `device` too.

    `w8a8` picks the GPU W8A8 path: "int8" (exact codes), "fp8", or "auto" (per (K, N) shape, the
    faster at `tune_rows` input rows, timed once here so that the choice is fixed and recorded).
    `objective` (OBJECTIVES; module docstring): None keeps that choice; "speed" times each layer's
    candidates, "dequantized" included, at `tune_rows` rows on a CUDA device and keeps the fastest;
    "memory" keeps the fewest weight bits. With an objective, W8A8 candidates are those `w8a8` allows
    ("auto": int8 and fp8), and every linear's entry records `objective` ("speed": `timings_ms`, `rows`).
    Layers that stay simulated are listed with the reason. Attention matmuls stay modules; where their
    K and V quantizers are static per-tensor the KV cache stores their 8-bit codes (`kv_cache` in the
    matmuls' entries; KVCodec), and on CUDA cached decoding runs the fused kernel over that cache
    (`decode` in the entries; FusedAttention), the matmuls otherwise.
    `recorded`: an earlier plan's entries ({layer: {"path", ...}}, a manifest's execution record from the
    same kind of card): each listed linear runs its recorded path, untimed, if that path is one of its
    candidates here (else ConfigError); the entry keeps the record's objective and timings.
    """
    if w8a8 not in W8A8_CHOICES:
        raise ConfigError(f"w8a8 must be one of {W8A8_CHOICES}, got {w8a8!r}")
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    if objective == "speed" and device.type != "cuda":
        raise ConfigError(
            f"objective 'speed' times the kernels on a CUDA device; got {device} (use None or 'memory')"
        )
    dtype = next(model.parameters()).dtype
    report: dict[str, dict] = {}
    timings: dict = {}
    for name, module in list(iter_quant_modules(model)):
        if isinstance(module, QuantMatMul):
            report[name] = {"path": "simulated", "reason": "attention matmul (activation x activation)"}
            continue
        path, reason = plan_layer(module, device, w8a8)
        chosen = {} if objective is None else {"objective": objective}
        if recorded is not None and name in recorded:
            path, reason, chosen = _replayed(name, path, reason, recorded[name])
        elif objective == "speed" and path != "simulated":
            path, reason, timed = _fastest(module, path, reason, tune_rows, dtype, device, timings)
            chosen |= timed
        elif objective == "memory" and path != "simulated":
            path = _smallest(path)
        elif path == "auto":
            path, reason = _pick_w8a8(module, tune_rows, dtype, device, timings)
        if path == "simulated":
            report[name] = {"path": path, "reason": reason} | chosen
            continue
        real = RealQuantLinear.from_quant_linear(module, path, device)
        swap_module(model, name, real)
        report[name] = real.describe_execution() | ({"reason": reason} if reason else {}) | chosen
    for name, module in model.named_modules():
        if hasattr(module, "kv_codec"):
            module.kv_codec, reason = kv_codec_for(module)
            for matmul in ("matmul_qk", "matmul_pv"):
                if f"{name}.{matmul}" in report:
                    cache = "8-bit codes" if module.kv_codec is not None else f"model dtype ({reason})"
                    report[f"{name}.{matmul}"]["kv_cache"] = cache
    for name, reason in install_fused_attention(model, device).items():
        for matmul in ("matmul_qk", "matmul_pv"):
            if f"{name}.{matmul}" in report:
                report[f"{name}.{matmul}"]["decode"] = "fused kernel" if not reason else f"matmuls ({reason})"
    return report


def kv_codec_for(attention: nn.Module) -> tuple[KVCodec | None, str]:
    """An 8-bit K/V cache codec when both cached operands meet static per-tensor <= 8-bit quantizers."""
    matmuls = (getattr(attention, "matmul_qk", None), getattr(attention, "matmul_pv", None))
    if not all(isinstance(m, QuantMatMul) for m in matmuls):
        return None, "the attention matmuls are not quantized"
    quantizers = tuple(m.b_quantizer for m in matmuls)
    for q in quantizers:
        static = isinstance(q, UniformQuantizer) and q.mode == "on" and q.granularity == "tensor"
        if not static or q.n_bits > 8 or not bool(q.initialized):
            return None, "K or V is not quantized static per-tensor at <= 8 bits"
        if q.passthrough is not None and q.passthrough.numel():
            return None, "sink positions of K or V stay in FP"
    return KVCodec(*quantizers), ""


def plan_execution(model: nn.Module, device: str | torch.device = "cpu") -> dict[str, dict]:
    """What `to_real` would run per layer on `device`, without converting (no timing: "auto" stays)."""
    device = torch.device(device)
    plan = {}
    for name, module in iter_quant_modules(model):
        if isinstance(module, QuantMatMul):
            plan[name] = {"path": "simulated", "reason": "attention matmul (activation x activation)"}
            continue
        path, reason = plan_layer(module, device)
        plan[name] = {"path": "int8-gpu|fp8-gpu" if path == "auto" else path} | (
            {"reason": reason} if reason else {}
        )
    return plan


def summarize(report: dict[str, dict]) -> dict[str, int]:
    """Layers per path, for one-line summaries."""
    counts: dict[str, int] = {}
    for entry in report.values():
        counts[entry["path"]] = counts.get(entry["path"], 0) + 1
    return counts
