"""Weight-only int8 / packed int4 GEMM for the small-batch decode path (Triton, CUDA only).

y = s_w * (x @ q^T - z * rowsum(x)) + bias, with q the stored integer weight codes. The kernel only
computes the partial products x @ q^T, split over K so that a decode step (M = 2 x batch rows) still
fills the GPU; the per-row scale, zero-point and bias are applied by the caller in one epilogue.

Storage: 8-bit codes as int8 (q - 128, with z shifted the same way); 4-bit codes packed two per byte,
byte j of a row holding k = j (low nibble) and k = j + K/2 (high nibble), so each half of K is read
with plain strided loads and no interleave.

Importing this module imports Triton; callers import it lazily, only on a CUDA device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Programs per multiprocessor to aim for when choosing split-K (memory-bound: keep loads in flight).
_WAVES = 2


@triton.jit
def _wo_gemm_kernel(
    x_ptr,
    w_ptr,
    part_ptr,
    M,
    N,
    K_ITER,  # columns of w iterated over: K for 8-bit, K // 2 for packed 4-bit
    HALF,  # K // 2 for packed 4-bit (offset of the high-nibble columns of x), unused for 8-bit
    stride_xm,
    stride_wn,
    stride_ps,
    stride_pm,
    k_per_split,
    BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm[:, None] < M
    n_ok = rn[:, None] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_s * k_per_split
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        kk = k0 + rk
        k_ok = kk[None, :] < K_ITER
        w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :], mask=n_ok & k_ok, other=0)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_ok & k_ok, other=0.0)
        if BITS == 8:
            acc += tl.dot(x, tl.trans(w.to(tl.bfloat16)))
        else:
            lo = (w & 0xF).to(tl.bfloat16)
            hi = ((w >> 4) & 0xF).to(tl.bfloat16)
            xh = tl.load(x_ptr + rm[:, None] * stride_xm + (kk + HALF)[None, :], mask=m_ok & k_ok, other=0.0)
            acc += tl.dot(x, tl.trans(lo))
            acc += tl.dot(xh, tl.trans(hi))
    out = part_ptr + pid_s * stride_ps + rm[:, None] * stride_pm + rn[None, :]
    tl.store(out, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def wo_gemm(x: torch.Tensor, qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 (M, N) = x (M, K) bf16 @ codes^T, codes int8 (N, K) or packed uint8 (N, K // 2)."""
    m, k = x.shape
    n = qweight.shape[0]
    k_iter = k if bits == 8 else k // 2
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n, block_k = 64, 128 if bits == 8 else 64
    grid_n, grid_m = triton.cdiv(n, block_n), triton.cdiv(m, block_m)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    k_blocks = triton.cdiv(k_iter, block_k)
    split = max(1, min(k_blocks, triton.cdiv(_WAVES * sms, grid_n * grid_m)))
    k_per_split = triton.cdiv(k_blocks, split) * block_k
    split = triton.cdiv(k_iter, k_per_split)
    parts = torch.empty(split, m, n, device=x.device, dtype=torch.float32)
    _wo_gemm_kernel[(grid_n, grid_m, split)](
        x,
        qweight,
        parts,
        m,
        n,
        k_iter,
        k // 2,
        x.stride(0),
        qweight.stride(0),
        parts.stride(0),
        parts.stride(1),
        k_per_split,
        BITS=bits,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
        num_stages=3,
    )
    # A fixed-order sum over the splits keeps the result deterministic (no atomics).
    return parts[0] if split == 1 else parts.sum(0)
