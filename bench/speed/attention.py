"""Attention over a static KV cache at serving shapes: the fused kernel against the matmul path and SDPA.

    PYTHONPATH=. python bench/speed/attention.py --out DIR      # on a CUDA machine, ~1 minute

One decode call of one layer, CUDA events over `--reps` calls after a warm-up, at the shapes the end-to-end
bench decodes: LlamaGen-XL batch 256 (512 rows with CFG, 20 heads of 64, a 577-position cache) at the middle
and the last step, and a VAR-d16 batch-64 last scale (256 queries over 680 visible keys). Per case:

    matmul (compiled)  the layer's own path in the bf16 variant: q K^T over the whole static cache, masked,
                       fp32 softmax, P V, under torch.compile (what compiled bf16 runs)
    matmul over u8     the same after decoding a whole 8-bit cache (a layer without the fused kernel)
    sdpa               F.scaled_dot_product_attention over exactly the visible keys (a sliced cache: the
                       best library kernel, but not graph-capturable at a changing length)
    fused bf16         quantcore::cached_attention over the bf16 cache
    fused u8 (<decode>) the same over 8-bit codes, each way the kernel can turn codes into numbers
                       (quantcore.kernels.attention.DECODES); each checked against the first
                       (max |difference| / max |first|)

GB/s counts the K/V bytes of the visible keys only (what a perfect kernel must read).

    PYTHONPATH=. python bench/speed/attention.py --tiles --out DIR   # the tile sweep, ~2 minutes

`--tiles` times the fused kernel over the u8 and the bf16 cache with each candidate tile forced
(quantcore.kernels.attention.TILE: queries and keys per program, warps, pipeline stages), checked against
the kernel's default tile; the kernel's TILES come from this sweep.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from functools import partial
from pathlib import Path

import torch
from torch.nn import functional as F

from quantcore.quant.real import time_ms

CASES = (  # name, rows (batch x CFG), heads, queries, cache length, visible keys, causal
    ("llamagen-xl b256 mid step", 512, 20, 1, 577, 289, True),
    ("llamagen-xl b256 last step", 512, 20, 1, 577, 577, True),
    ("var-d16 b64 13x13 scale", 128, 16, 169, 680, 424, False),
    ("var-d16 b64 last scale", 128, 16, 256, 680, 680, False),
)
KV = [0.02, 128.0, 0.03, 120.0]  # s_k, z_k, s_v, z_v
# candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) per program for the sweep, the kernel's earlier tile first
DECODE_TILES = ((16, 64, 4, 2), (16, 64, 4, 3), (16, 64, 4, 4), (16, 128, 4, 2), (16, 128, 4, 3),
                (16, 128, 8, 3), (16, 32, 2, 3), (16, 64, 2, 3), (16, 256, 8, 2))  # fmt: skip
SCALE_TILES = ((64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3),
               (128, 32, 8, 3), (128, 64, 4, 2), (64, 128, 4, 2), (128, 128, 8, 2))  # fmt: skip


def _matmul_path(q, k, v, mask, scale):
    scores = (q @ k.transpose(-2, -1)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).type_as(q) @ v


def _matmul_path_over_codes(q, k_codes, v_codes, mask, scale):
    """What a layer without the fused kernel runs over an 8-bit cache: decode it whole, then the matmuls."""
    (s_k, z_k), (s_v, z_v) = KV[0:2], KV[2:4]
    k = ((k_codes.float() - z_k) * s_k).to(q.dtype)
    v = ((v_codes.float() - z_v) * s_v).to(q.dtype)
    return _matmul_path(q, k, v, mask, scale)


def case_tensors(case):
    """q, the u8 K/V codes, their bf16 values, q's positions and the mask of one case."""
    _, rows, heads, t, length, visible, causal = case
    d = 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(rows, heads, t, d, device="cuda", generator=g).to(torch.bfloat16)
    codes = [torch.randint(0, 256, (rows, heads, length, d), device="cuda", dtype=torch.uint8, generator=g)
             for _ in "kv"]  # fmt: skip
    floats = [
        ((c.float() - z) * s).to(torch.bfloat16) for c, s, z in zip(codes, KV[0::2], KV[1::2], strict=True)
    ]
    qpos = torch.arange(visible - t, visible, device="cuda")
    keys = torch.arange(length, device="cuda")
    mask = (keys[None, :] <= qpos[:, None]) if causal else (keys[None, :] < visible).expand(t, length)
    return q, codes, floats, qpos, mask


def visible_kv_bytes(case, d: int) -> dict[str, int]:
    """Bytes of the K/V a query block can see, by cache: what a perfect kernel must read."""
    _, rows, heads, _, _, visible, _ = case
    return {"u8": 2 * rows * heads * visible * d, "bf16": 2 * rows * heads * visible * d * 2}


def bench_case(case, reps: int, decodes: tuple[str, ...]) -> list[dict]:
    import quantcore.kernels.attention as attention

    name, rows, heads, t, length, visible, causal = case
    d, scale = 64, 1 / math.sqrt(64)
    q, codes, floats, qpos, mask = case_tensors(case)
    compiled, compiled_codes = torch.compile(_matmul_path), torch.compile(_matmul_path_over_codes)
    op = torch.ops.quantcore.cached_attention
    kv_bytes = visible_kv_bytes(case, d)
    runs = {
        "matmul (compiled)": ("bf16", lambda: compiled(q, *floats, mask, scale)),
        "matmul over u8 (compiled)": ("u8", lambda: compiled_codes(q, *codes, mask, scale)),
        "sdpa": ("bf16", lambda: F.scaled_dot_product_attention(
            q, floats[0][:, :, :visible], floats[1][:, :, :visible], is_causal=False)),
        "fused bf16": ("bf16", lambda: op(q, *floats, qpos, length, causal, scale, KV, 0, [])),
    }  # fmt: skip
    out, first, default = [], None, attention.DECODE
    for decode in decodes:
        attention.DECODE = attention.DECODES.index(decode)
        try:
            got = op(q, *codes, qpos, length, causal, scale, KV, 0, [])
        except Exception as exc:  # a way that does not compile here is recorded, the others still run
            out.append({"case": name, "kernel": f"fused u8 ({decode})", "error": str(exc)[:300]})
            continue
        first = got if first is None else first
        err = float((got.float() - first.float()).abs().max() / first.float().abs().max())
        ms = time_ms(lambda: op(q, *codes, qpos, length, causal, scale, KV, 0, []), reps)
        gbs = kv_bytes["u8"] / ms / 1e6
        out.append({"case": name, "kernel": f"fused u8 ({decode})", "ms": round(ms, 4), "kv_gb_per_s": round(gbs),
                    "max_diff_vs_first": err})  # fmt: skip
    attention.DECODE = default
    for kernel, (cache, fn) in runs.items():
        ms = time_ms(fn, reps)
        out.append({"case": name, "kernel": kernel, "ms": round(ms, 4),
                    "kv_gb_per_s": round(kv_bytes[cache] / ms / 1e6)})  # fmt: skip
    return out


def sweep_tiles(case, reps: int) -> list[dict]:
    """The fused kernel over both caches with each candidate tile forced, against the default tile."""
    import quantcore.kernels.attention as attention

    name, rows, heads, t, length, visible, causal = case
    q, codes, floats, qpos, _ = case_tensors(case)
    d = q.shape[-1]
    op, scale = torch.ops.quantcore.cached_attention, 1 / math.sqrt(d)
    visible_bytes = visible_kv_bytes(case, d)
    out = []
    for cache, kv in (("u8", codes), ("bf16", floats)):
        call = partial(op, q, *kv, qpos, length, causal, scale, KV, 0, [])

        attention.TILE = None
        default = call()
        for tile in DECODE_TILES if t <= 16 else SCALE_TILES:
            attention.TILE = tile
            try:
                got = call()
                ms = time_ms(call, reps)
            except Exception as exc:  # a tile that does not fit (shared memory, registers) is recorded
                out.append({"case": name, "kernel": f"fused {cache} tile {tile}", "error": str(exc)[:300]})
                continue
            finally:
                attention.TILE = None
            err = float((got.float() - default.float()).abs().max() / default.float().abs().max())
            out.append({"case": name, "kernel": f"fused {cache} tile {tile}", "ms": round(ms, 4),
                        "kv_gb_per_s": round(visible_bytes[cache] / ms / 1e6), "max_diff_vs_first": err})  # fmt: skip
            print(json.dumps(out[-1]), flush=True)
    return out


def markdown(rows: list[dict], card: str, against: str = "first u8 way") -> str:
    lines = [f"# Cached attention, one layer, one call ({card})", "",
             f"| case | kernel | ms | visible K/V GB/s | rel. diff vs {against} |", "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['kernel']} | error: {r['error'][:80]} | | |")
            continue
        diff = r.get("max_diff_vs_first")
        lines.append(f"| {r['case']} | {r['kernel']} | {r['ms']:.3f} | {r['kv_gb_per_s']} | "
                     f"{'' if diff is None else f'{diff:.1e}'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--tiles", action="store_true", help="sweep the kernel's tiles instead")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("attention.py: needs a CUDA device")
    import quantcore.kernels.attention as attention

    rows = []
    for case in CASES:
        if args.tiles:
            if "last step" not in case[0]:  # the mid step stands for decoding
                rows += sweep_tiles(case, args.reps)
            continue
        rows += bench_case(case, args.reps, attention.DECODES)
        print(json.dumps(rows[-1]), flush=True)
    card = torch.cuda.get_device_name()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = ("attention-tiles-" if args.tiles else "attention-") + card.lower().replace(" ", "-")
    meta = {"card": card, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    (args.out / f"{stem}.json").write_text(json.dumps({"machine": meta, "rows": rows}, indent=1))
    against = "the default tile" if args.tiles else "first u8 way"
    (args.out / f"{stem}.md").write_text(markdown(rows, card, against))
    print(markdown(rows, card, against))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
