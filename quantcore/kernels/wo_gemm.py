"""Low-bit linears with dequantization fused into one GEMM kernel (Triton, CUDA only).

Two custom ops share one kernel; `torch.compile` keeps each as a single opaque call and CUDA graphs
capture it:

    quantcore::wo_linear   weight-only   y = s_w * (x @ (q_w - z_w)^T) + bias
    quantcore::a8_linear   W(<=8)A(<=8)  y = s_x s_w * ((q_x - z_x) @ (q_w - z_w)^T) + bias,
                           q_x = clamp(round(x / s_x) + z_x, 0, 2^a - 1) computed in the kernel from
                           per-row (s_x, z_x): static per-tensor or STWQ tables already gathered by pos

Both integer operands are formed in the kernel as bf16, which is exact (|q - z| <= 255), and multiplied
on the bf16 tensor cores with fp32 accumulation: the integer products are exact and only the fp32 sum
rounds (relative 6e-8), so a8_linear reproduces the int8 GEMM's result to fp32 accumulation rounding
without a separate quantize kernel or an int32 epilogue. It is the decode-sized path (few rows: weight
bytes, not MACs, set the time); larger M goes to the int8/fp8 tensor-core GEMMs (real.py decides).

Every output tile is one program over the full K, with the epilogue (scales, bias, store in x's dtype)
in the kernel: one launch per linear. For few rows the tile shape is autotuned per (M, N, K) at the
first call (outside any CUDA-graph capture): small BLOCK_N spreads the weight stream over the
multiprocessors, deeper pipelines keep loads in flight.

Storage: 8-bit codes as int8 (q - 128, z shifted the same way; Int8Linear's padded matrix is read in
place through its row stride); 4-bit codes packed two per byte, byte j of a row holding k = j (low
nibble) and k = j + K/2 (high nibble). Importing this module imports Triton: only on a CUDA device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

SKINNY_ROWS = 256  # up to this many rows: autotuned tiles of at most 64 rows (enough programs)


def _skinny_configs() -> list[triton.Config]:
    """Tiles for few rows: the weight stream must be spread over enough programs and stages."""
    shapes = (
        (16, 512, 4, 3),
        (32, 256, 4, 4),
        (64, 256, 4, 3),
        (64, 128, 4, 4),
        (128, 128, 8, 4),
        (128, 256, 8, 3),
    )
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st) for n, k, w, st in shapes]


@triton.jit
def _lowbit_body(
    x_ptr,
    w_ptr,
    wz_ptr,
    ws_ptr,
    xs_ptr,
    xz_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K_ITER,  # columns of w iterated over: K for 8-bit, K // 2 for packed 4-bit
    HALF,  # K // 2 for packed 4-bit (offset of the high-nibble columns of x), unused for 8-bit
    stride_xm,
    stride_wn,
    stride_om,
    X_QMAX: tl.constexpr,  # 0 = weight-only; else 2^a - 1 and x is quantized in the prologue
    BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    wz = tl.load(wz_ptr + rn, mask=n_ok, other=0.0)[:, None]
    if X_QMAX > 0:
        xs = tl.load(xs_ptr + rm, mask=m_ok, other=1.0)[:, None]
        xz = tl.load(xz_ptr + rm, mask=m_ok, other=0.0)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_ITER, BLOCK_K):
        kk = k0 + rk
        k_ok = kk[None, :] < K_ITER
        w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :], mask=n_ok[:, None] & k_ok, other=0)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok, other=0.0)
        if X_QMAX > 0:  # (q_x - z_x) as exact small integers from x in its own precision
            q = tl.minimum(tl.maximum(libdevice.rint(x.to(tl.float32) / xs) + xz, 0.0), X_QMAX)
            x = tl.where(k_ok, q - xz, 0.0).to(tl.bfloat16)
        else:
            x = x.to(tl.bfloat16)
        if BITS == 8:
            acc += tl.dot(x, tl.trans((w.to(tl.float32) - wz).to(tl.bfloat16)))
        else:
            lo = ((w & 0xF).to(tl.float32) - wz).to(tl.bfloat16)
            hi = (((w >> 4) & 0xF).to(tl.float32) - wz).to(tl.bfloat16)
            xh = tl.load(
                x_ptr + rm[:, None] * stride_xm + (kk + HALF)[None, :], mask=m_ok[:, None] & k_ok, other=0.0
            )
            xh = xh.to(tl.bfloat16)
            acc += tl.dot(x, tl.trans(lo))
            acc += tl.dot(xh, tl.trans(hi))
    acc = acc * tl.load(ws_ptr + rn, mask=n_ok, other=0.0)[None, :]
    if X_QMAX > 0:
        acc = acc * xs
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_mask = m_ok[:, None] & n_ok[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype == torch.float32 else torch.bfloat16


_skinny_kernel = triton.autotune(configs=_skinny_configs(), key=["M", "N", "K_ITER", "X_QMAX", "BITS"])(
    _lowbit_body
)


def _launch(x2, qweight, n, k, w_zp, w_scale, x_scale, x_zp, bias, bits, x_qmax) -> torch.Tensor:
    """One launch: autotuned skinny tiles (timed once per shape, at the first call) up to SKINNY_ROWS
    rows, fixed 128 x 128 tiles above."""
    m = x2.shape[0]
    out = torch.empty(m, n, device=x2.device, dtype=_out_dtype(x2))
    args = (
        x2,
        qweight,
        w_zp,
        w_scale,
        x_scale if x_scale is not None else w_scale,
        x_zp if x_zp is not None else w_zp,
        bias if bias is not None else w_scale,
        out,
        m,
        n,
        k if bits == 8 else k // 2,
        k // 2,
        x2.stride(0),
        qweight.stride(0),
        out.stride(0),
    )
    flags = dict(X_QMAX=x_qmax, BITS=bits, HAS_BIAS=bias is not None)
    if m <= SKINNY_ROWS:
        block_m = min(64, max(16, triton.next_power_of_2(m)))
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, block_m))  # noqa: E731
        _skinny_kernel[grid](*args, **flags, BLOCK_M=block_m)
    else:
        grid = (triton.cdiv(n, 128), triton.cdiv(m, 128))
        _lowbit_body[grid](*args, **flags, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    return out


@torch.library.custom_op("quantcore::wo_linear", mutates_args=())
def wo_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    zero_point: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
) -> torch.Tensor:
    """(..., N) = s * (x @ (q - z)^T) + bias for x (..., K) bf16/fp32; q int8 (N, K) or packed uint8 (N, K/2)."""
    n, k = qweight.shape[0], x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    out = _launch(x2, qweight, n, k, zero_point, scale, None, None, bias, bits, 0)
    return out.reshape(*x.shape[:-1], n)


@wo_linear.register_fake
def _(x, qweight, zero_point, scale, bias, bits):
    return x.new_empty(*x.shape[:-1], qweight.shape[0], dtype=_out_dtype(x))


@torch.library.custom_op("quantcore::a8_linear", mutates_args=())
def a8_linear(
    x: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero_point: torch.Tensor,
    qweight: torch.Tensor,
    w_zero_point: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    a_bits: int,
) -> torch.Tensor:
    """(M, N) in x's dtype for x (M, K) with per-row activation (scale, zero-point) (M,) float and int8 weight
    codes (N', K') (q_w - 128, possibly padded: only N x K is read)."""
    k = x.shape[-1]
    scale, zp = x_scale.contiguous(), x_zero_point.contiguous()  # per-tensor params arrive expanded
    return _launch(
        x.contiguous(), qweight, out_features, k, w_zero_point, w_scale, scale, zp, bias, 8, 2**a_bits - 1
    )


@a8_linear.register_fake
def _(x, x_scale, x_zero_point, qweight, w_zero_point, w_scale, bias, out_features, a_bits):
    return x.new_empty(x.shape[0], out_features, dtype=_out_dtype(x))
