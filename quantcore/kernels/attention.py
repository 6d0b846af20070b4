"""Attention over a layer's static K/V cache in one fused kernel (Triton, CUDA only).

    quantcore::cached_attention   out (B, H, T, D) = softmax(scale * q k^T) v over the first keys of the
                                  cache, K/V read as 8-bit codes (decoded in registers) or in bf16

Why: at serving batch sizes a decode step is dominated by reading the cache (LlamaGen-XL batch 256: ~54 GB
in bf16 at the last step, against 1.5 GB of weights). The eager path decodes the codes into a bf16 copy
of the whole cache and multiplies under a mask; this kernel reads each code once, and only the keys a
query can see (causal: up to its own position, which it reads from `q_pos` on the device, so one CUDA
graph serves every step).

Numerics, the recipe's (quantcore.quant.modules.QuantMatMul with per-tensor uniform K/V quantizers):
the tensor cores take the exact integers code - z, and s_k scales the scores, s_v the accumulator, so
k_hat = (code - z_k) s_k is used unrounded where the simulated path's KVCodec.decode rounds it to bf16;
the query arrives already fake-quantized by its own quantizer. Where the recipe quantizes the softmax output
(uniform per-tensor or log-sqrt2), the probabilities must be the normalized ones, which an online softmax
does not have: the kernel then runs twice, a first pass for each query's max and sum (reads K only), a
second that normalizes, rounds to bf16 as the simulated path does, fake-quantizes and multiplies by V.
Scores stay in fp32 (the simulated path rounds them to bf16: the one numeric difference, measured in
tests/test_real_gpu.py).

Work split: one program per (batch x head, block of BLOCK_M queries, key split). Few rows (decode at
batch 1: 2 rows x 20 heads) would leave the GPU idle, so the keys are split over up to 64 programs per
query block and a combine kernel merges the partial (max, sum, accumulator) triples. Where the grid is
large enough without splitting (serving batches, VAR's scales) each program writes its rows' final
output itself: no fp32 partials, no combine launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TARGET_PROGRAMS = 4 * 132  # enough programs for every multiprocessor of an H100/H200, a few times over
MAX_SPLITS = 64
NEG = tl.constexpr(-1.0e30)  # "minus infinity" that keeps exp() and max() free of NaN for fully masked rows

# probability quantizer kinds (quantcore.quant.quantizer): none, uniform per-tensor, log-sqrt2
P_NONE, P_UNIFORM, P_LOG_SQRT2 = 0, 1, 2
# passes: one online-softmax pass; the statistics pass and the quantized-probability pass
ONLINE, STATS, QUANT_P = 0, 1, 2
# how the kernel turns uint8 codes into numbers for the tensor cores (bench/speed/attention.py times each)
DECODES = ("convert", "fp16-bits", "prmt")
# None picks by shape, from bench/speed/attention.py on an H100 (2026-12-07): prmt at decode steps
# (LlamaGen-XL batch 256 mid step 0.268 ms against convert's 0.283), convert at VAR's many-query scales
# (VAR-d16 batch 64 last scale 0.616 ms against prmt's 0.669); an index into DECODES forces one way
DECODE: int | None = None


# (BLOCK_M queries, BLOCK_N keys, warps, pipeline stages) per program, by shape (decode steps: <= 16 queries
# per head; VAR's many-query scales) and cache (8-bit codes or the model dtype). From the sweep of
# bench/speed/attention.py --tiles on an H100 (2026-12-07, attention-tiles-nvidia-h100-80gb-hbm3.md), ms:
# LlamaGen-XL b256 mid step u8 0.228 (against 0.266 for the earlier (16, 64, 4, 2)), bf16 0.253 (0.260);
# VAR-d16 b64 last scale u8 0.506 (0.536), bf16 0.412 (0.609). TILE forces one tile (the sweep).
TILES = {
    ("decode", True): (16, 32, 2, 3),
    ("decode", False): (16, 64, 2, 3),
    ("scales", True): (64, 64, 4, 3),
    ("scales", False): (128, 64, 8, 3),
}
TILE: tuple[int, int, int, int] | None = None


def decode_for(queries: int) -> int:
    """The index into DECODES that the kernel uses for `queries` queries per head."""
    if DECODE is not None:
        return DECODE
    return DECODES.index("prmt" if queries <= 16 else "convert")


def tile_for(queries: int, codes: bool, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for `queries` queries per head over a cache of codes or
    floats of `dtype`. fp32 operands (tests, CPU-sized models on a GPU) take two stages: three of fp32
    tiles at a head dim of 128 would pass the multiprocessor's shared memory."""
    block_m, block_n, warps, stages = TILE or TILES["decode" if queries <= 16 else "scales", codes]
    return block_m, block_n, warps, min(stages, 2) if dtype == torch.float32 else stages


@triton.jit
def _rint(x):
    """Round half to even, as torch.round (exact for |x| < 2^22: x + 0.5 does not round)."""
    r = tl.floor(x + 0.5)
    odd = r - 2.0 * tl.floor(r * 0.5)
    return tl.where((r - x == 0.5) & (odd == 1.0), r - 1.0, r)


@triton.jit
def _centred(codes, zp, HALF: tl.constexpr, DECODE: tl.constexpr):
    """uint8 codes minus their zero-point, exactly (integers in -255..255). "convert": through fp32, two
    conversion instructions per element, which Hopper issues at a quarter of its fp32 rate (the suspected
    bound of the 8-bit cache at batch 256, not yet profiled). Where HALF, in fp16 without conversions:
    the bits 0x6400 | c are the fp16 number 1024 + c, built by integer ops ("fp16-bits") or two byte
    permutes per four codes ("prmt"), then one fp16 subtraction."""
    if HALF:
        if DECODE == 2:
            x = tl.inline_asm_elementwise(
                "prmt.b32 $0, $2, 0x64646464, 0x4140;\n\tprmt.b32 $1, $2, 0x64646464, 0x4342;",
                "=r,=r,r", [codes], dtype=tl.float16, is_pure=True, pack=4,
            )  # fmt: skip
        else:
            x = (codes.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
        centred = x - tl.cast(1024.0 + zp, tl.float16)
    else:
        centred = codes.to(tl.float32) - zp
    return centred


@triton.jit
def _attention_body(
    q_ptr, k_ptr, v_ptr, qpos_ptr, acc_ptr, stat_ptr, gstat_ptr, out_ptr,
    kv_len, T, H, GROUP, CHUNK, SPLITS,
    sq_b, sq_h, sq_t,
    sk_b, sk_h, sk_l,
    sm_scale, k_scale, k_zp, v_scale, v_zp, p_scale, p_zp, P_QMAX,
    PASS: tl.constexpr, CODES: tl.constexpr, CAUSAL: tl.constexpr, P_KIND: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, DECODE: tl.constexpr, DIRECT: tl.constexpr,
):  # fmt: skip
    # The tensor cores take the model dtype, as the simulated matmuls do; over a cache of codes decoded
    # without conversions they take fp16: exact for the centred codes and for q and p once rounded to the
    # model dtype (p is, as the matmul path rounds it: fp16's 11 bits would not be the recipe's 8 and failed
    # the grouped-head case on an H100); a query beyond fp16's 65504 would overflow: none of the bundled
    # families comes near it.
    OP = q_ptr.dtype.element_ty
    HALF: tl.constexpr = CODES and OP != tl.float32 and DECODE > 0
    CT = tl.float16 if HALF else OP
    bh = tl.program_id(0)
    mb = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    rm = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)  # the head dim padded to a power of two; the pad lanes read zeros
    d_ok = rd < D
    rn = tl.arange(0, BLOCK_N)
    m_ok = rm < T
    q_at = q_ptr + b * sq_b + h * sq_h + rm[:, None] * sq_t + rd[None, :]
    q = tl.load(q_at, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    score_scale = sm_scale
    if CODES:
        score_scale = sm_scale * k_scale
    q = q.to(CT)
    hi = kv_len
    if CAUSAL:
        qpos = tl.load(qpos_ptr + rm, mask=m_ok, other=0)
        hi = tl.minimum(kv_len, tl.max(qpos) + 1)
    lo = split * CHUNK
    end = tl.minimum(lo + CHUNK, hi)
    k_base = k_ptr + b * sk_b + kvh * sk_h
    v_base = v_ptr + b * sk_b + kvh * sk_h
    row = bh * T + rm  # query row index into the statistics buffers
    if PASS == 2:  # the global max and sum of this query row, from the statistics pass
        m_i = tl.load(gstat_ptr + row * 2, mask=m_ok, other=0.0)
        l_i = tl.load(gstat_ptr + row * 2 + 1, mask=m_ok, other=1.0)
        inv_l = 1.0 / tl.where(l_i > 0, l_i, 1.0)
    else:
        m_i = tl.full((BLOCK_M,), NEG, tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(lo, end, BLOCK_N):
        keys = start + rn
        n_ok = keys < end
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + keys[:, None] * sk_l + rd[None, :], mask=kv_ok, other=0)
        if CODES:  # code - z exactly, in the compute type; s_k multiplies the sums
            k = _centred(k, k_zp, HALF, DECODE)
        s = tl.dot(q, tl.trans(k.to(CT)), input_precision=PRECISION) * score_scale
        seen = n_ok[None, :]
        if CAUSAL:
            seen = seen & (keys[None, :] <= qpos[:, None])
        s = tl.where(seen, s, NEG)
        if PASS == 1:
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.where(seen, tl.exp(s - m_new[:, None]), 0.0), axis=1)
            m_i = m_new
        else:
            v = tl.load(v_base + keys[:, None] * sk_l + rd[None, :], mask=kv_ok, other=0)
            if CODES:  # s_v multiplies the accumulator at the end
                v = _centred(v, v_zp, HALF, DECODE)
            v = v.to(CT)
            if PASS == 0:
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                alpha = tl.exp(m_i - m_new)
                p = tl.where(seen, tl.exp(s - m_new[:, None]), 0.0)
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p.to(OP).to(CT), v, input_precision=PRECISION)
                m_i = m_new
            else:  # normalized probabilities in the model dtype, fake-quantized as the recipe does
                p = tl.where(seen, tl.exp(s - m_i[:, None]) * inv_l[:, None], 0.0)
                p = p.to(OP).to(tl.float32)
                if P_KIND == 1:
                    code = _rint(tl.div_rn(p, p_scale)) + p_zp
                    code = tl.minimum(tl.maximum(code, 0.0), P_QMAX)
                    p = (code - p_zp) * p_scale
                if P_KIND == 2:  # P_QMAX holds the level count 2^b here
                    code = _rint(-2.0 * tl.log2(tl.div_rn(p, p_scale)))
                    under = code >= P_QMAX
                    code = tl.minimum(tl.maximum(code, 0.0), P_QMAX - 1)
                    odd = tl.where(code - 2.0 * tl.floor(code * 0.5) == 1.0, 1.4142135623730951, 1.0)
                    p = tl.where(under, 0.0, tl.exp2(-tl.ceil(code * 0.5)) * odd * p_scale)
                acc += tl.dot(p.to(OP).to(CT), v, input_precision=PRECISION)
    if CODES and PASS != 1:
        acc = acc * v_scale
    out_ok = m_ok[:, None] & d_ok[None, :]
    if DIRECT:  # one split holds every key of these rows: what the combine would compute, written here
        if PASS == 1:
            tl.store(gstat_ptr + row * 2, m_i, mask=m_ok)
            tl.store(gstat_ptr + row * 2 + 1, l_i, mask=m_ok)
        else:
            if PASS == 0:
                acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out_ptr + row[:, None] * D + rd[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_ok)
    else:
        srow = row * SPLITS + split
        if PASS != 2:
            tl.store(stat_ptr + srow * 2, m_i, mask=m_ok)
            tl.store(stat_ptr + srow * 2 + 1, l_i, mask=m_ok)
        if PASS != 1:
            tl.store(acc_ptr + srow[:, None] * D + rd[None, :], acc, mask=out_ok)


@triton.jit
def _combine(acc_ptr, stat_ptr, out_ptr, gstat_ptr, ROWS, SPLITS,
             PASS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    """Merge the key splits of BLOCK_R query rows: the output (ONLINE: rescaled by each split's max;
    QUANT_P: a plain sum) or, after the STATS pass, each row's global (max, sum)."""
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rs = tl.arange(0, BLOCK_S)
    rd = tl.arange(0, BLOCK_D)
    r_ok = rr < ROWS
    rd_ok = r_ok[:, None] & (rd[None, :] < D)
    ok = r_ok[:, None] & (rs[None, :] < SPLITS)
    srow = rr[:, None] * SPLITS + rs[None, :]
    if PASS == 2:
        total = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
        for s in range(0, SPLITS):
            total += tl.load(acc_ptr + (rr * SPLITS + s)[:, None] * D + rd[None, :], mask=rd_ok, other=0.0)
        tl.store(out_ptr + rr[:, None] * D + rd[None, :], total.to(out_ptr.dtype.element_ty), mask=rd_ok)
    else:
        m = tl.load(stat_ptr + srow * 2, mask=ok, other=NEG)
        l = tl.load(stat_ptr + srow * 2 + 1, mask=ok, other=0.0)
        m_all = tl.max(m, axis=1)
        w = tl.exp(m - m_all[:, None])
        l_all = tl.sum(w * l, axis=1)
        if PASS == 1:
            tl.store(gstat_ptr + rr * 2, m_all, mask=r_ok)
            tl.store(gstat_ptr + rr * 2 + 1, l_all, mask=r_ok)
        else:
            total = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
            for s in range(0, SPLITS):
                ms = tl.load(stat_ptr + (rr * SPLITS + s) * 2, mask=r_ok, other=NEG)
                a = tl.load(acc_ptr + (rr * SPLITS + s)[:, None] * D + rd[None, :], mask=rd_ok, other=0.0)
                total += a * tl.exp(ms - m_all)[:, None]
            total = total / tl.where(l_all > 0, l_all, 1.0)[:, None]
            tl.store(
                out_ptr + rr[:, None] * D + rd[None, :],
                total.to(out_ptr.dtype.element_ty),
                mask=rd_ok,
            )


def _splits(programs: int, kv_len: int, block_n: int) -> int:
    """Key splits so that the grid has about TARGET_PROGRAMS programs (fewer where the keys run out)."""
    want = -(-TARGET_PROGRAMS // max(programs, 1))
    return max(1, min(want, MAX_SPLITS, -(-kv_len // block_n)))


def _block_d(d: int) -> int:
    """The head dim as the kernels tile it: a power of two, at least the tensor cores' 16."""
    return max(16, triton.next_power_of_2(d))


def _run_pass(pass_, q, k_cache, v_cache, q_pos, kv_len, causal, codes, params, out, gstat, p_kind, p_qmax):
    """One pass of the attention kernel, then (over several key splits) the combine kernel: the output
    goes to `out` (ONLINE, QUANT_P) or each query row's (max, sum) to `gstat` (STATS)."""
    b, h, t, d = q.shape
    group = h // k_cache.shape[1]
    block_m, block_n, warps, stages = tile_for(t, codes, q.dtype)
    m_blocks = triton.cdiv(t, block_m)
    splits = _splits(b * h * m_blocks, kv_len, block_n)
    chunk = triton.cdiv(triton.cdiv(kv_len, splits), block_n) * block_n
    rows = b * h * t
    direct = splits == 1
    if direct:  # the kernel writes out / gstat itself; the partial buffers are not touched
        acc, stat = out, gstat
    else:
        acc = torch.empty(rows * splits, d, device=q.device, dtype=torch.float32)
        stat = torch.empty(rows * splits, 2, device=q.device, dtype=torch.float32)
    sm_scale, k_scale, k_zp, v_scale, v_zp, p_scale, p_zp = params
    _attention_body[(b * h, m_blocks, splits)](
        q, k_cache, v_cache, q_pos, acc, stat, gstat, out,
        kv_len, t, h, group, chunk, splits,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        sm_scale, k_scale, k_zp, v_scale, v_zp, p_scale, p_zp, p_qmax,
        PASS=pass_, CODES=codes, CAUSAL=causal, P_KIND=p_kind, D=d, BLOCK_D=_block_d(d), BLOCK_M=block_m, BLOCK_N=block_n,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", DECODE=decode_for(t), DIRECT=direct,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if not direct:
        block_r = 16
        _combine[(triton.cdiv(rows, block_r),)](
            acc, stat, out, gstat, rows, splits,
            PASS=pass_, D=d, BLOCK_D=_block_d(d), BLOCK_S=triton.next_power_of_2(splits), BLOCK_R=block_r, num_warps=4,
        )  # fmt: skip


@torch.library.custom_op("quantcore::cached_attention", mutates_args=())
def cached_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_pos: torch.Tensor,
    kv_len: int,
    causal: bool,
    sm_scale: float,
    kv_params: list[float],
    p_kind: int,
    p_params: list[float],
) -> torch.Tensor:
    """(B, H, T, D) in q's dtype for q (B, H, T, D) and caches (B' >= B, H_kv, L, D), uint8 codes or q's
    dtype. Keys 0..kv_len-1 are read; `causal` also hides keys after each query's position `q_pos` (T,).
    kv_params = [s_k, z_k, s_v, z_v] (ignored for float caches); p_params = [scale, zero-point, qmax]
    (uniform) or [scale, 0, 2^b] (log-sqrt2) of the probability quantizer, p_kind one of P_*."""
    b, h, t, d = q.shape
    q = q.contiguous()
    codes = k_cache.dtype == torch.uint8
    params = (sm_scale, *kv_params, *(p_params[:2] if p_kind else (1.0, 0.0)))
    p_qmax = p_params[2] if p_kind else 1.0
    rows = b * h * t
    out = torch.empty(b, h, t, d, device=q.device, dtype=q.dtype)
    gstat = torch.empty(rows, 2, device=q.device, dtype=torch.float32)
    args = (q, k_cache, v_cache, q_pos, kv_len, causal, codes, params, out, gstat, p_kind, p_qmax)
    if p_kind == P_NONE:
        _run_pass(ONLINE, *args)
    else:  # the statistics first: the probabilities the recipe quantizes are the normalized ones
        _run_pass(STATS, *args)
        _run_pass(QUANT_P, *args)
    return out


@cached_attention.register_fake
def _(q, k_cache, v_cache, q_pos, kv_len, causal, sm_scale, kv_params, p_kind, p_params):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
