"""Speed of real low-bit execution: end-to-end generation and per-GEMM roofline, on a GPU and on the CPU.

    PYTHONPATH=. python bench/speed/run.py gpu --models llamagen-b,var-d16 --out DIR   # one part per call
    PYTHONPATH=. python bench/speed/run.py report DIR/gpu-*.json --out bench/speed      # merge the parts
    PYTHONPATH=. python bench/speed/run.py cpu --out bench/speed                        # on the CPU machine

GPU: full-size LlamaGen-B/L/XL, VAR-d16/d20, RAR-B/L and MAR-B/L with random weights (speed does not depend on
their values), class-conditional generation with CFG (2 x batch rows), for compiled bf16, W8A8 fp8,
W8A8 int8, weight-only W8 and W4, and planner-speed (weight-only W4 converted with
`to_real(objective="speed")`: per layer the fastest of w4-gpu, w8-gpu and the simulated layer, whose
GEMM is a bf16 GEMM on the dequantized weight, timed at batch 1's 2 rows). Every variant runs
`quantcore.fastgen.FastSampler` with `compile=True`: each transformer block, the head and the sampling
go through `torch.compile`, the KV caches are static, and decoding replays a CUDA graph (LlamaGen/RAR:
one token step; VAR: the whole multi-scale generation). All variants of a model run in the same call on the same card, so the ratios
compare like with like. Quantized variants get synthetic calibrated parameters (per-row min/max weight
ranges; STWQ group tables on block inputs, per-tensor on the head input, as the ptq4arvg recipe
produces) and go through `quantcore.quant.real.to_real`, exactly as an artifact would. Attention
matmuls and the KV cache stay bf16 in every variant.

Per GEMM: every distinct linear shape at the decode row counts, each kernel captured 20 times in a
CUDA graph over enough weight copies to defeat the L2 cache, against the roofline floor
max(bytes / measured copy bandwidth, FLOPs / datasheet peak).

CPU: the tiny registry models calibrated by the engine (ptq4arvg W8A8), fp32 vs simulated vs int8
`torch._int_mm`, LlamaGen-B (random weights, batch 1) fp32 vs int8, and per-GEMM fp32 vs int8.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import platform
import re
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch.nn import functional as F

from quantcore.fastgen import FastSampler
from quantcore.models import bind_tokenizer, family
from quantcore.quant.modules import QuantLinear, QuantMatMul, make_act_quantizer, swap_module
from quantcore.quant.quantizer import params_from_range
from quantcore.quant.real import install_fused_attention, pack_codes, summarize, to_real
from quantcore.registry import get_spec
from quantcore.tokenizers import build_tokenizer

GPU_MODELS = (
    "llamagen-b",
    "llamagen-l",
    "llamagen-xl",
    "var-d16",
    "var-d20",
    "var-d30",
    "rar-b",
    "rar-l",
    "mar-b",
    "mar-l",
)
GPU_VARIANTS = ("bf16", "bf16-fused", "w8a8-fp8", "w8a8-fp8-kv", "w8a8-int8", "w8", "w4", "planner-speed")
# a variant may name the way its fused attention kernel decodes 8-bit codes: "w8a8-fp8-kv@fp16-bits"
PLANNER_ROWS = 2  # planner-speed times its candidates at batch 1's decode shape (CFG: 2 rows)
BATCHES = {
    "llamagen": (1, 8, 32, 64),
    "rar": (1, 8, 32, 64),
    "var": (1, 8, 16, 32, 64),
    "mar": (1, 8, 32, 64),
}
EIGHT_BIT = ("w8a8-fp8", "w8a8-fp8-kv", "w8a8-int8", "w8")
W8A8 = ("w8a8-fp8", "w8a8-fp8-kv", "w8a8-int8")  # 8-bit weights with the 8-bit KV cache


def split_variant(variant: str) -> tuple[str, str | None]:
    """Split "w8a8-fp8-kv@fp16-bits" into ("w8a8-fp8-kv", "fp16-bits"): a variant and the way its fused attention
    kernel decodes 8-bit codes (one of quantcore.kernels.attention.DECODES; none: the module's default)."""
    base, _, decode = variant.partition("@")
    return base, decode or None


def variant_order(variants) -> list[str]:
    """The variants present, in GPU_VARIANTS order (a decode-suffixed one right after its base)."""
    return sorted(set(variants), key=lambda v: (GPU_VARIANTS.index(split_variant(v)[0]), v))


# VAR compiles once per scale shape: 42-61 s per batch size and variant on an H100 (2026-12-07), so the default
# bench (five batch sizes, eight variants) runs VAR eager, replayed from one CUDA graph; --compile-families var;
# MAR's encoder width changes every round, so its plan runs eager step by step (no graph) in every variant
EAGER_FAMILIES = ("var", "mar")
# Datasheet dense peaks (H100/H200 SXM, TFLOP/s); the measured copy bandwidth replaces the HBM figure.
PEAK_TFLOPS = {"bf16": 989.0, "int8": 1979.0, "fp8": 1979.0, "w8": 989.0, "w4": 989.0}


# ---------------------------------------------------------------------------------------------------
# Models with synthetic calibrated parameters
# ---------------------------------------------------------------------------------------------------


def random_model(name: str, device: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    spec = get_spec(name)
    torch.manual_seed(seed)
    model = spec.build(device)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:  # matrices and tables; norms, biases and VAR's scale_mul keep their init
                p.normal_(0.0, 0.02)
    model = model.to(device, dtype).eval()
    if spec.family == "var":  # scale inputs come from the VQ-VAE's quantizer (fp32, as in the library)
        bind_tokenizer(model, build_tokenizer(spec.config.tokenizer, device).eval())
    return model


@torch.no_grad()
def synthetic_quantize(model, w_bits: int, a_bits: int | None, attention: bool | str = True) -> None:
    """QuantLinears with the parameter shapes the ptq4arvg recipe produces, without calibration data."""
    layout = family(model.family).quant_layout(model)
    heads = {n for s in layout.fold_sites if s.head for n in s.linears}
    for name in layout.all_linears:
        ql = QuantLinear.from_linear(model.get_submodule(name), w_bits, a_bits or 8)
        w = ql.weight.float()
        scale, zp = params_from_range(w.amin(1), w.amax(1), w_bits)
        ql.weight_quantizer.scale.copy_(scale)
        ql.weight_quantizer.zero_point.copy_(zp.to(torch.int32))
        ql.weight_quantizer.initialized.fill_(True)
        ql.weight_quantizer.set_mode("on")
        if a_bits is not None:
            table = None if name in heads else layout.groups_for(name, per_position=False)
            aq = make_act_quantizer(a_bits, "tensor" if table is None else "group", group_of_position=table)
            lo = torch.full_like(aq.scale, -4.0)
            s, z = params_from_range(lo, -lo, a_bits)
            aq.scale.copy_(s)
            aq.zero_point.copy_(z.to(torch.int32))
            aq.initialized.fill_(True)
            aq.set_mode("on")
            ql.input_quantizer = aq
        ql.to(w.device)
        swap_module(model, name, ql)
    if (
        a_bits is not None
    ):  # attention operands too, as the recipes quantize them: K and V get cached as codes
        for name in layout.matmuls:
            qm = QuantMatMul.from_bits(a_bits, a_bits)
            if attention == "kv":  # the recipe's quantize_attention="kv": queries and probabilities stay
                qm.a_quantizer = None
            a_range = (0.0, 1.0) if name in layout.prob_matmuls else (-4.0, 4.0)  # softmax output or q
            pairs = ((qm.a_quantizer, a_range), (qm.b_quantizer, (-4.0, 4.0)))
            for q, (lo, hi) in (pair for pair in pairs if pair[0] is not None):
                s, z = params_from_range(torch.full_like(q.scale, lo), torch.full_like(q.scale, hi), a_bits)
                q.scale.copy_(s)
                q.zero_point.copy_(z.to(torch.int32))
                q.initialized.fill_(True)
                q.set_mode("on")
            swap_module(model, name, qm.to(next(model.parameters()).device))


def build_variant(name: str, variant: str, device: str):
    model = random_model(name, device, torch.bfloat16)
    if variant == "bf16":
        return model, {}
    if variant == "bf16-fused":  # the bf16 model with the fused attention kernel over its bf16 cache
        reasons = install_fused_attention(model)
        return model, {n: {"path": "bf16", "decode": r or "fused kernel"} for n, r in reasons.items()}
    bits = {
        "w8a8-fp8": (8, 8),
        "w8a8-fp8-kv": (8, 8),
        "w8a8-int8": (8, 8),
        "w8": (8, None),
        "w4": (4, None),
        "planner-speed": (4, None),
    }
    synthetic_quantize(model, *bits[variant], attention="kv" if variant.endswith("-kv") else True)
    if variant == "planner-speed":
        report = to_real(model, objective="speed", tune_rows=PLANNER_ROWS)
    else:
        report = to_real(model, w8a8="fp8" if variant.startswith("w8a8-fp8") else "int8")
    torch.cuda.empty_cache()
    return model, report


def _attention_kind(report: dict) -> str:
    """How the variant's cached decoding attends: "matmuls", or the fused kernel and its code decode."""
    if not any(e.get("decode") == "fused kernel" for e in report.values()):
        return "matmuls"
    from quantcore.kernels import attention

    codes = any(e.get("kv_cache") == "8-bit codes" for e in report.values())
    if not codes:
        return "fused kernel"
    way = "by shape" if attention.DECODE is None else attention.DECODES[attention.DECODE]
    return f"fused kernel ({way} decode)"


def model_bytes(model: torch.nn.Module) -> int:
    tensors = [*model.parameters(), *(b for b in model.buffers() if b is not None)]
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------------------------------------
# GPU: end to end
# ---------------------------------------------------------------------------------------------------


def time_generation(sampler: FastSampler, reps: int) -> float:
    classes = torch.arange(sampler.batch) % 1000
    seeds = list(range(sampler.batch))
    sampler.generate(classes, seeds)
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sampler.generate(classes, seeds)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_end_to_end(
    models, variants, reps, log, deadline: float, save, batches=None, eager=EAGER_FAMILIES
) -> list[dict]:
    rows = []
    for name in models:
        spec = get_spec(name)
        sampling = spec.entry.sampling.to_dict()
        for variant in variants:
            if time.perf_counter() > deadline:
                rows.append({"model": name, "variant": variant, "error": "skipped: out of the call's time"})
                continue
            torch._dynamo.reset()  # each variant compiles afresh: no stale guards, no recompile limit
            base, decode = split_variant(variant)
            with attention_decode(decode):
                _bench_variant(name, variant, base, spec, sampling, reps, log, save, batches, eager, rows)
    return rows


@contextlib.contextmanager
def attention_decode(decode: str | None):
    """Run with the fused attention kernel decoding 8-bit codes the `decode` way (None: as it is)."""
    from quantcore.kernels import attention

    default = attention.DECODE
    if decode is not None:
        attention.DECODE = attention.DECODES.index(decode)
    try:
        yield
    finally:
        attention.DECODE = default


def _bench_variant(name, variant, base, spec, sampling, reps, log, save, batches, eager, rows) -> None:
    """Measure one variant at each batch, appending to `rows` (saved after each, so a cut-off call keeps them)."""
    t0 = time.perf_counter()
    model, report = build_variant(name, base, "cuda")
    built = time.perf_counter() - t0
    for batch in batches or BATCHES[spec.family]:
        torch.cuda.reset_peak_memory_stats()
        weights = model_bytes(model)  # no KV caches yet
        leftover = torch.cuda.memory_allocated() - weights
        try:  # one failing configuration is recorded, the rest still run
            t0 = time.perf_counter()
            sampler = FastSampler(model, batch, sampling, compile=spec.family not in eager)
            compiled = time.perf_counter() - t0
            latency = time_generation(sampler, reps)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            rows.append({"model": name, "variant": variant, "batch": batch, "error": str(exc)[:300]})
            log(f"{name} {variant} {batch}: {exc}")
            model.clear_caches()
            continue
        tokens = spec.config.num_tokens
        row = {
            "model": name,
            "variant": variant,
            "batch": batch,
            "tokens": tokens,
            "latency_s": round(latency, 4),
            "images_per_s": round(batch / latency, 2),
            "ms_per_token_step": round(1e3 * latency / sampler.plan.steps, 4),
            # peak of this run: weights + KV caches + graph pool + workspaces, without what
            # earlier runs left allocated in this process
            "peak_mem_gib": round((torch.cuda.max_memory_allocated() - leftover) / 2**30, 3),
            "weights_gib": round(weights / 2**30, 3),
            "leftover_gib": round(leftover / 2**30, 3),
            "paths": summarize(report) if report else {"bf16": "all"},
            "kv_cache": "8-bit codes"
            if any(e.get("kv_cache") == "8-bit codes" for e in report.values())
            else "model dtype",
            "attention": _attention_kind(report),
            "build_s": round(built, 1),
            "compile_capture_s": round(compiled, 1),
            "compiled": spec.family not in eager,
        }
        rows.append(row)
        log(json.dumps(row))
        save(rows)
        sampler.close()
        del sampler
        gc.collect()  # the plan's compiled bound methods form cycles: free its buffers now
        torch.cuda.empty_cache()
    del model, report
    torch._dynamo.reset()  # compiled code holds the model: free it before the next variant
    gc.collect()
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# GPU: where one decode step's time goes
# ---------------------------------------------------------------------------------------------------

# kernel name -> kind, first match wins (Inductor names its fused kernels triton_{poi,red,per}_...)
KERNEL_KINDS = (
    ("attention", re.compile(r"_attention_body|_combine|flash|fmha|sdpa|softmax", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|sm90_|nvjet|_lowbit_body|scaled_mm|matmul", re.I)),
    ("fused elementwise / norm", re.compile(r"^triton_", re.I)),
)


def kernel_kind(name: str) -> str:
    return next((kind for kind, pattern in KERNEL_KINDS if pattern.search(name)), "other")


def profile_steps(name: str, variants, batch: int, steps: int, log) -> list[dict]:
    """GPU time per kernel over `steps` decode steps from the middle of the sequence, step by step (the
    kernels a graph replays, without the graph), per variant; kernels grouped by KERNEL_KINDS."""
    spec = get_spec(name)
    out = []
    for variant in variants:
        base, decode = split_variant(variant)
        with attention_decode(decode):
            out.append(_profile_variant(spec, variant, base, batch, steps, log))
    return out


def _profile_variant(spec, variant, base, batch, steps, log) -> dict:
    from torch.profiler import ProfilerActivity, profile

    name = spec.name
    torch._dynamo.reset()
    model, _ = build_variant(name, base, "cuda")
    sampler = FastSampler(model, batch, spec.entry.sampling.to_dict(), compile=True, graph=False)
    plan = sampler.plan
    plan.install_caches()
    plan.reset(torch.arange(batch, device="cuda") % 1000, list(range(batch)))
    plan.prologue()
    middle = plan.steps // 2
    for _ in range(max(middle, 1)):  # compiling happens in the first step (VAR: a whole generation)
        plan.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            plan.step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in kernels)
    kinds: dict[str, float] = {}
    for e in kernels:
        kind = kernel_kind(e.key)
        kinds[kind] = kinds.get(kind, 0.0) + e.device_time_total
    top = sorted(kernels, key=lambda e: -e.device_time_total)[:12]
    row = {
        "model": name,
        "variant": variant,
        "batch": batch,
        "steps": f"{middle}..{middle + steps - 1} of {plan.steps}",
        "gpu_ms_per_step": round(total / 1e3 / steps, 3),
        "ms_per_step_by_kind": {k: round(v / 1e3 / steps, 3) for k, v in sorted(kinds.items())},
        "top_kernels": [
            {
                "kernel": e.key[:120],
                "kind": kernel_kind(e.key),
                "calls_per_step": e.count // steps,
                "ms_per_step": round(e.device_time_total / 1e3 / steps, 3),
            }
            for e in top
        ],  # fmt: skip
    }
    log(json.dumps(row))
    sampler.close()
    del sampler, plan, model
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    return row


def profile_markdown(rows: list[dict], card: str) -> str:
    lines = [f"# One decode step, kernel by kernel ({card})", ""]
    for r in rows:
        kinds = ", ".join(f"{k} {v} ms" for k, v in r["ms_per_step_by_kind"].items())
        lines += [f"## {r['model']} {r['variant']} batch {r['batch']}: {r['gpu_ms_per_step']} ms of GPU time "
                  f"per step (steps {r['steps']})", "", kinds, "",
                  "| kernel | kind | calls/step | ms/step |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| `{k['kernel']}` | {k['kind']} | {k['calls_per_step']} | {k['ms_per_step']} |"
                  for k in r["top_kernels"]]  # fmt: skip
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# GPU: per-GEMM timings against the roofline
# ---------------------------------------------------------------------------------------------------


def linear_shapes(name: str) -> dict[str, tuple[int, int]]:
    """(K, N) of each distinct linear of a model, named by its first occurrence."""
    model = get_spec(name).build("meta")
    shapes: dict[tuple[int, int], str] = {}
    for layer in family(model.family).quant_layout(model).all_linears:
        w = model.get_submodule(layer).weight
        key = (w.shape[1], w.shape[0])
        shapes.setdefault(key, re.sub(r"^(layers|blocks)\.\d+\.", "", layer))
    return {label: key for key, label in shapes.items()}


def gemm_rows(name: str) -> tuple[int, ...]:
    """Rows per GEMM call: decode steps (2 x batch) for one-token families, VAR's last scale, MAR's
    decoder (every buffer and image position)."""
    family_name = get_spec(name).family
    if family_name == "mar":
        return tuple(2 * b * get_spec(name).config.seq_len for b in (1, 8))
    if family_name == "var":
        last = get_spec(name).config.patch_nums[-1] ** 2
        return tuple(2 * b * last for b in (1, 16))
    return tuple(2 * b for b in (1, 8, 32, 64))


def measure_bandwidth() -> float:
    """Device-to-device copy bandwidth, bytes read + written per second."""
    from triton.testing import do_bench

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def graph_time_us(calls: list, reps: int = 10) -> float:
    """Median µs per call of `calls` (closures over different weight copies) replayed in one CUDA graph."""
    for fn in calls:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def bench_gemms(models, bandwidth: float, log) -> list[dict]:
    import quantcore.kernels.wo_gemm  # noqa: F401  (registers quantcore::wo_linear)

    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    out, seen = [], set()
    for name in models:
        for layer, (k, n) in linear_shapes(name).items():
            for m in gemm_rows(name):
                if (m, k, n) in seen:
                    continue
                seen.add((m, k, n))
                copies = max(2, min(24, -(-3 * l2 // (n * k))))  # > 3x L2 of int8 weights in flight
                w = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
                wi8 = [
                    torch.randint(-128, 128, (n, k), device="cuda", dtype=torch.int8) for _ in range(copies)
                ]
                w4 = [pack_codes(t.view(torch.uint8) & 0xF, 4) for t in wi8]
                wf8 = [t.to(torch.float8_e4m3fn) for t in w]
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                xi8 = torch.randint(-128, 128, (max(m, 32), k), device="cuda", dtype=torch.int8)
                xf8 = x.to(torch.float8_e4m3fn)
                sx, sw = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
                zp, sc = torch.zeros(n, device="cuda"), torch.ones(n, device="cuda")
                kinds = {  # (calls, weight bytes per element, activation bytes, output bytes)
                    "bf16": ([partial(F.linear, x, t) for t in w], 2, 2, 2),
                    "int8": ([partial(torch._int_mm, xi8, t.t()) for t in wi8], 1, 1, 4),
                    "fp8": (
                        [
                            partial(torch._scaled_mm, xf8, t.t(), sx, sw, out_dtype=torch.bfloat16)
                            for t in wf8
                        ],
                        1,
                        1,
                        2,
                    ),
                    "w8": (
                        [partial(torch.ops.quantcore.wo_linear, x, t, zp, sc, None, 8) for t in wi8],
                        1,
                        2,
                        2,
                    ),
                    "w4": (
                        [partial(torch.ops.quantcore.wo_linear, x, t, zp, sc, None, 4) for t in w4],
                        0.5,
                        2,
                        2,
                    ),
                }
                for kind, (calls, w_bytes, a_bytes, o_bytes) in kinds.items():
                    row = {"model": name, "layer": layer, "M": m, "K": k, "N": n, "kind": kind}
                    try:
                        us = graph_time_us(calls * max(1, 20 // copies))
                    except RuntimeError as exc:  # a shape a library kernel refuses is a result too
                        out.append(row | {"error": str(exc)[:200]})
                        continue
                    moved = m * k * a_bytes + n * k * w_bytes + m * n * o_bytes
                    flops = 2 * m * k * n
                    floor = max(moved / bandwidth, flops / (PEAK_TFLOPS[kind] * 1e12))
                    row |= {
                        "us": round(us, 2),
                        "floor_us": round(floor * 1e6, 2),
                        "of_roofline": round(floor / (us * 1e-6), 3),
                        "TFLOPs": round(flops / (us * 1e-6) / 1e12, 1),
                        "GBps": round(moved / (us * 1e-6) / 1e9, 1),
                    }
                    out.append(row)
                del w, wi8, w4, wf8
                torch.cuda.empty_cache()
            log(f"gemms {name} {layer} done")
    return out


def check_paths(log) -> dict:
    """Relative error of every real path against simulation on LlamaGen-B layers, before any timing."""
    x = torch.randn(1, 64, get_spec("llamagen-b").config.dim, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(1, 65, device="cuda")
    result = {}
    for label, bits, w8a8 in (
        ("int8", (8, 8), "int8"),
        ("fp8", (8, 8), "fp8"),
        ("w8", (8, None), "auto"),
        ("w4", (4, None), "auto"),
    ):
        sim = random_model("llamagen-b", "cuda", torch.bfloat16)
        synthetic_quantize(sim, *bits)
        real = copy.deepcopy(sim)
        to_real(real, w8a8=w8a8)
        errs = []
        for layer in ("attention.wqkv", "feed_forward.w2"):
            k = sim.layers[0].get_submodule(layer).in_features
            inp = x if k == x.shape[-1] else torch.randn(1, 64, k, device="cuda", dtype=torch.bfloat16)
            ref = sim.layers[0].get_submodule(layer)(inp, pos).double()
            got = real.layers[0].get_submodule(layer)(inp, pos).double()
            errs.append(float((got - ref).norm() / ref.norm()))
        result[label] = round(max(errs), 5)
        del sim, real
    log(f"path check, relative error vs simulation: {result}")
    return result


# ---------------------------------------------------------------------------------------------------
# CPU
# ---------------------------------------------------------------------------------------------------


def cpu_best(fn, reps: int) -> float:
    """Fastest of `reps` runs: on a shared 2-core machine the slower runs measure the neighbours."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _cpu_sampler(model, batch: int, sampling: dict, compile: bool) -> tuple[FastSampler, float]:
    """A warmed-up sampler (compiles, if asked, on the first call) and the seconds that took."""
    if compile:
        torch._dynamo.reset()  # a fresh compile per sampler: no recompile limit across models and batches
    t0 = time.perf_counter()
    sampler = FastSampler(model, batch, sampling, compile=compile, graph=False)
    _cpu_generate(sampler)
    return sampler, time.perf_counter() - t0


def _cpu_generate(sampler: FastSampler) -> torch.Tensor:
    batch = sampler.batch
    return sampler.generate(torch.arange(batch) % sampler.model.config.num_classes, list(range(batch)))


def bench_cpu(reps: int, log) -> dict:
    from quantcore.calib import CalibrationSpec, build_calibration_set
    from quantcore.pipeline import quantize
    from quantcore.recipe import Recipe

    rows = []
    for name, batches in (("tiny-llamagen", (1, 8, 32)), ("tiny-rar", (1, 8, 32)), ("llamagen-b", (1,))):
        spec = get_spec(name)
        sampling = spec.entry.sampling.to_dict()
        if name in ("llamagen-b",):  # random weights, synthetic ranges: the GEMM-bound case
            fp = random_model(name, "cpu", torch.float32)
            sim = copy.deepcopy(fp)
            synthetic_quantize(sim, 8, 8)
        else:  # the bundled weights, calibrated by the engine
            from quantcore.registry import load_model

            fp = load_model(name).float()
            calib = build_calibration_set(fp, CalibrationSpec(num_samples=16, batch_size=16), sampling)
            sim = copy.deepcopy(fp)
            quantize(sim, Recipe.preset("ptq4arvg", 8, 8), calib)
        real = copy.deepcopy(sim)
        report = to_real(real)
        for batch in batches:
            times, tokens, first_call = {}, {}, {}
            variants = [("fp32", fp, False), ("fp32_compiled", fp, True), ("int8", real, False)]
            variants += [("int8_compiled", real, True)]
            variants += [("simulated", sim, False)] if name != "llamagen-b" else []
            for label, model, compile in variants:
                sampler, first_call[label] = _cpu_sampler(model, batch, sampling, compile)
                times[label] = cpu_best(partial(_cpu_generate, sampler), reps)
                tokens[label] = _cpu_generate(sampler)
                sampler.close()
            agree = (tokens["int8"] == tokens["simulated"]).float().mean() if "simulated" in tokens else None
            row = {
                "model": name,
                "batch": batch,
                **{f"{k}_s": round(v, 4) for k, v in times.items()},
                "int8_vs_fp32": round(times["fp32"] / times["int8"], 3),
                "int8_compiled_vs_fp32_compiled": round(times["fp32_compiled"] / times["int8_compiled"], 3),
                "int8_compiled_vs_fp32": round(times["fp32"] / times["int8_compiled"], 3),
                "first_call_s": {k: round(v, 1) for k, v in first_call.items()},
                "token_agreement_int8_vs_simulated": None if agree is None else float(agree),
                "paths": summarize(report),
            }
            rows.append(row)
            log(json.dumps(row))
    gemms = []
    for m in (2, 16, 64, 256):
        for k, n in ((768, 2304), (2048, 768), (1024, 4096), (768, 16384)):
            x, w = torch.randn(m, k), torch.randn(n, k)
            xi = torch.randint(-128, 128, (m, k), dtype=torch.int8)
            wi = torch.randint(-128, 128, (n, k), dtype=torch.int8)
            t32 = cpu_best(partial(F.linear, x, w), reps * 4)
            t8 = cpu_best(partial(torch._int_mm, xi, wi.t()), reps * 4)
            gemms.append(
                {
                    "M": m,
                    "K": k,
                    "N": n,
                    "fp32_us": round(t32 * 1e6, 1),
                    "int8_us": round(t8 * 1e6, 1),
                    "int8_speedup": round(t32 / t8, 2),
                    "fp32_GFLOPs": round(2 * m * k * n / t32 / 1e9, 1),
                    "int8_GOPs": round(2 * m * k * n / t8 / 1e9, 1),
                }
            )
            log(json.dumps(gemms[-1]))
    return {"end_to_end": rows, "gemms": gemms}


# ---------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------


def machine_info(kind: str) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "cpu": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if "model name" in ln), "?"),
    }
    if kind == "gpu":
        import triton

        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "sms": props.multi_processor_count, "cuda": torch.version.cuda}
        info |= {"triton": triton.__version__, "gpu_mem_gib": round(props.total_memory / 2**30, 1)}
    return info


def _by_variant(rows: list[dict], model: str, batch: int) -> dict[str, dict]:
    return {
        r["variant"]: r for r in rows if r["model"] == model and r.get("batch") == batch and "error" not in r
    }


def targets(parts: list[dict]) -> list[dict]:
    """Issue 15's targets, each with the measured value and the part (card) it comes from."""
    out = []

    def add(target, goal, value, best, met, card, extra=""):
        out.append(
            {"target": target, "goal": goal, "measured": f"{value} ({best}){extra}", "met": met, "card": card}
        )

    def w8a8(by):  # the W8A8 variants measured, decode-suffixed ones included
        return [v for v in by if split_variant(v)[0] in W8A8]

    def speedup(by, variants, key="images_per_s"):
        """The best of `variants` over bf16 on `key` (images/s: higher is better)."""
        have = [v for v in variants if v in by]
        if "bf16" not in by or not have:
            return None, None
        best = max(have, key=lambda v: by[v][key])
        return round(by[best][key] / by["bf16"][key], 3), best

    for part in parts:
        rows, card = part["end_to_end"], part["machine"]["gpu"]
        for model in sorted({r["model"] for r in rows}):
            batches = sorted({r["batch"] for r in rows if r["model"] == model and "batch" in r})
            if not batches:
                continue
            top = max(batches)  # the throughput batch: the largest this part measured
            by_top, by_one = _by_variant(rows, model, top), _by_variant(rows, model, 1)
            if model == "llamagen-xl" and top >= 64:
                value, best = speedup(by_top, w8a8(by_top))
                if value is not None:
                    vs_fused = ""
                    if "bf16-fused" in by_top:
                        ratio = by_top[best]["images_per_s"] / by_top["bf16-fused"]["images_per_s"]
                        vs_fused = f"; {ratio:.2f}x of bf16 with the fused kernel"
                    add(f"LlamaGen-XL batch {top}, W8A8 + 8-bit KV cache images/s", ">= 1.5x",
                        f"{value}x", best, value >= 1.5, card, vs_fused)  # fmt: skip
            if model in ("var-d16", "var-d30") and top >= 64:
                value, best = speedup(by_top, w8a8(by_top))
                if value is not None:
                    add(
                        f"{model} batch {top}, W8A8 images/s",
                        ">= 1.3x",
                        f"{value}x",
                        best,
                        value >= 1.3,
                        card,
                    )
            if "planner-speed" in by_one and "bf16" in by_one:
                value = round(by_one["bf16"]["latency_s"] / by_one["planner-speed"]["latency_s"], 3)
                add(f"{model} batch 1, planner speed vs bf16 latency", ">= 1.0x", f"{value}x",
                    "planner-speed", value >= 1.0, card)  # fmt: skip
            for batch, by in {1: by_one, top: by_top}.items():
                have = w8a8(by)
                if "bf16" in by and have:
                    best = min(have, key=lambda v: by[v]["peak_mem_gib"])
                    value = round(by[best]["peak_mem_gib"] / by["bf16"]["peak_mem_gib"], 3)
                    add(f"{model} batch {batch}, peak memory W8A8 + 8-bit cache / bf16", "<= 0.55", value,
                        best, value <= 0.55, card)  # fmt: skip
    return out


def gpu_markdown(result: dict) -> str:
    lines = ["# Real low-bit execution: GPU speed", ""]
    lines += [
        "Random weights; CFG on (2 x batch rows per step). Every variant, bf16 included, runs "
        "`quantcore.fastgen.FastSampler`: static KV caches, decoding replayed from a CUDA graph, and for "
        "LlamaGen and RAR torch.compile'd blocks, head and sampling (VAR: eager unless its part's note says compiled). "
        "Weight-only variants keep attention and the KV cache in bf16; W8A8 variants quantize the attention "
        "operands as the recipes do and cache K/V as 8-bit codes where a part says so (`kv_cache`). Peak "
        "memory is this run's own (weights, KV caches, graph pool, workspaces). Ratios are within one part "
        "(one call, one card). "
        "Reading the numbers: bench/speed/README.md.",
        "",
        "## Targets",
        "",
        "| target | goal | measured | met | card |",
        "|---|---|---|---|---|",
    ]
    for t in result["targets"]:
        lines.append(
            f"| {t['target']} | {t['goal']} | {t['measured']} | {'yes' if t['met'] else 'no'} | {t['card']} |"
        )
    for part in result["parts"]:
        info, e2e = part["machine"], part["end_to_end"]
        variants = variant_order(
            ["bf16", *(r["variant"] for r in e2e if "error" not in r)]
        )  # bf16: the ratios' base
        lines += [
            "",
            f"## {', '.join(part['models'])} -- {info['gpu']}",
            "",
            f"{info['gpu']} ({info['sms']} SMs), torch {info['torch']}, CUDA {info['cuda']}, Triton {info['triton']}, "
            f"{info['date']}; measured copy bandwidth {part['bandwidth_TBps']:.2f} TB/s. "
            + (
                f"Path check (relative error vs simulation, LlamaGen-B layer 0): {part['path_check']}"
                if "path_check" in part
                else "No path check in this call."
            ),
            *(["", f"Note: {part['note']}"] if "note" in part else []),
            "",
            "Latency (s per batch) and speedup over compiled bf16:",
            "",
            "| model | batch | "
            + " | ".join(variants)
            + " | "
            + " | ".join(f"x {v}" for v in variants[1:])
            + " |",
            "|" + "---|" * (2 + 2 * len(variants) - 1),
        ]
        keys = sorted(
            {(r["model"], r["batch"]) for r in e2e if "batch" in r},
            key=lambda t: (GPU_MODELS.index(t[0]), t[1]),
        )
        for model, batch in keys:
            by = _by_variant(e2e, model, batch)
            base = by.get("bf16", {}).get("latency_s")
            lat = [f"{by[v]['latency_s']:.3f}" if v in by else "-" for v in variants]
            ratio = [f"{base / by[v]['latency_s']:.2f}" if v in by and base else "-" for v in variants[1:]]
            lines.append(f"| {model} | {batch} | " + " | ".join(lat) + " | " + " | ".join(ratio) + " |")
        lines += ["", "Images/s, peak GPU memory GiB (weights GiB):", ""]
        lines += [
            "| model | batch | " + " | ".join(variants) + " |",
            "|" + "---|" * (2 + len(variants)),
        ]
        for model, batch in keys:
            by = _by_variant(e2e, model, batch)
            cells = [
                f"{by[v]['images_per_s']:.1f}, {by[v]['peak_mem_gib']:.2f} ({by[v]['weights_gib']:.2f})"
                if v in by
                else "-"
                for v in variants
            ]
            lines.append(f"| {model} | {batch} | " + " | ".join(cells) + " |")
        errors = [r for r in e2e if "error" in r]
        if errors:
            lines += [
                "",
                "Not measured: "
                + "; ".join(
                    f"{r['model']} {r['variant']} {r.get('batch', '')}: {r['error']}" for r in errors
                ),
            ]
        g = [r for r in part["gemms"] if "error" not in r]
        if g:
            lines += [
                "",
                "Per GEMM (µs per call inside a CUDA graph, weights rotated past the L2) and share of the roofline floor:",
                "",
                "| model | layer | M | K | N | bf16 | int8 | fp8 | w8 | w4 | best 8-bit vs bf16 | w4 vs bf16 | bf16 of roofline | w8 of roofline | w4 of roofline |",
                "|" + "---|" * 15,
            ]
            for key in sorted(
                {(r["model"], r["layer"], r["M"]) for r in g},
                key=lambda t: (GPU_MODELS.index(t[0]), t[1], t[2]),
            ):
                by = {r["kind"]: r for r in g if (r["model"], r["layer"], r["M"]) == key}
                first = next(iter(by.values()))
                best = min((by[k]["us"] for k in ("int8", "fp8", "w8") if k in by), default=None)
                cells = [
                    f"{by[k]['us']:.1f}" if k in by else "err" for k in ("bf16", "int8", "fp8", "w8", "w4")
                ]
                r8 = f"{by['bf16']['us'] / best:.2f}" if best and "bf16" in by else "-"
                r4 = f"{by['bf16']['us'] / by['w4']['us']:.2f}" if "w4" in by and "bf16" in by else "-"
                roof = [f"{by[k]['of_roofline']:.2f}" if k in by else "-" for k in ("bf16", "w8", "w4")]
                lines.append(
                    f"| {key[0]} | {key[1]} | {key[2]} | {first['K']} | {first['N']} | "
                    + " | ".join(cells)
                    + f" | {r8} | {r4} | "
                    + " | ".join(roof)
                    + " |"
                )
    return "\n".join(lines) + "\n"


def cpu_markdown(result: dict) -> str:
    info = result["machine"]
    lines = [
        "# Real low-bit execution: CPU speed",
        "",
        f"{info['cpu']}, {info['threads']} threads, torch {info['torch']}, {info['date']}. Fastest of repeats. "
        "Every row decodes with `FastSampler(graph=False)` (static KV cache), eager or with torch.compile'd "
        "blocks and head (Inductor's C++ backend; the first call, which compiles, is left out: first_call_s "
        "in the JSON). tiny-* use the bundled "
        "weights calibrated by the engine (ptq4arvg W8A8); llamagen-b has random weights and synthetic ranges.",
        "",
        "| model | batch | fp32 s | fp32 compiled s | simulated s | int8 s | int8 compiled s | int8 vs fp32 "
        "(eager) | int8 vs fp32 (compiled) | compiled int8 vs eager fp32 | token agreement int8 vs simulated |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["end_to_end"]:
        sim = f"{r['simulated_s']:.3f}" if "simulated_s" in r else "-"
        agree = r["token_agreement_int8_vs_simulated"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['fp32_s']:.3f} | {r['fp32_compiled_s']:.3f} | {sim} | "
            f"{r['int8_s']:.3f} | {r['int8_compiled_s']:.3f} | {r['int8_vs_fp32']:.2f}x | "
            f"{r['int8_compiled_vs_fp32_compiled']:.2f}x | {r['int8_compiled_vs_fp32']:.2f}x | "
            f"{'-' if agree is None else f'{agree:.3f}'} |"
        )
    lines += [
        "",
        "| M | K | N | fp32 µs | int8 µs | int8 speedup | fp32 GFLOP/s | int8 GOP/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["gemms"]:
        lines.append(
            f"| {r['M']} | {r['K']} | {r['N']} | {r['fp32_us']} | {r['int8_us']} | {r['int8_speedup']}x | "
            f"{r['fp32_GFLOPs']} | {r['int8_GOPs']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=("gpu", "cpu", "report", "profile"))
    parser.add_argument(
        "parts", nargs="*", type=Path, help="report: gpu part files or merged reports to merge"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--machine", default=None, help="name in the result files (default: the card / cpu)")
    parser.add_argument("--models", default=",".join(GPU_MODELS))
    parser.add_argument("--variants", default=",".join(GPU_VARIANTS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default: the family's)")
    parser.add_argument("--skip-gemms", action="store_true")
    parser.add_argument(
        "--skip-path-check", action="store_true", help="gpu: leave out the per-path agreement check (~35 s)"
    )
    parser.add_argument("--steps", type=int, default=4, help="profile: decode steps to profile")
    parser.add_argument(
        "--compile-families",
        default="",
        help=f"gpu: also torch.compile these of the eagerly run families {EAGER_FAMILIES} (compile_capture_s "
        "then holds the compile time)",
    )
    parser.add_argument("--budget-s", type=float, default=480, help="start no new GPU variant after this")
    args = parser.parse_args(argv)
    for variant in args.variants.split(",") if args.target in ("gpu", "profile") else ():
        base, decode = split_variant(variant)
        if base not in GPU_VARIANTS:
            parser.error(f"--variants: unknown variant {base!r}; choose from {', '.join(GPU_VARIANTS)}")
        if decode is not None:
            from quantcore.kernels.attention import DECODES  # needs Triton: only where a decode is named

            if decode not in DECODES:
                parser.error(
                    f"--variants: unknown decode {decode!r} in {variant!r}; choose from {', '.join(DECODES)}"
                )
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)

    torch.set_grad_enabled(False)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.target == "gpu":
        models = args.models.split(",")
        part = {"machine": machine_info("gpu"), "models": models}
        if not args.skip_path_check:
            part["path_check"] = check_paths(log)
        part["bandwidth_TBps"] = measure_bandwidth() / 1e12
        part["gemms"] = [] if args.skip_gemms else bench_gemms(models, part["bandwidth_TBps"] * 1e12, log)
        path = args.out / f"gpu-{'_'.join(models)}.json"

        def save(rows):  # a call cut off at its limit still leaves the rows measured so far
            path.write_text(json.dumps({**part, "end_to_end": rows}, indent=1))

        part["end_to_end"] = bench_end_to_end(
            models,
            args.variants.split(","),
            args.reps,
            log,
            started + args.budget_s,
            save,
            [int(b) for b in args.batches.split(",")] if args.batches else None,
            tuple(f for f in EAGER_FAMILIES if f not in args.compile_families.split(",")),
        )
        part["seconds"] = round(time.perf_counter() - started, 1)
        path.write_text(json.dumps(part, indent=1))
        print(gpu_markdown({"parts": [part], "targets": targets([part])}))
        return 0
    if args.target == "profile":  # one model, the first batch given
        batch = int((args.batches or "256").split(",")[0])
        rows = profile_steps(args.models.split(",")[0], args.variants.split(","), batch, args.steps, log)
        card = torch.cuda.get_device_name()
        stem = f"profile-{args.models.split(',')[0]}-b{batch}-{card.replace(' ', '-').lower()}"
        (args.out / f"{stem}.json").write_text(
            json.dumps({"machine": machine_info("gpu"), "rows": rows}, indent=1)
        )
        (args.out / f"{stem}.md").write_text(profile_markdown(rows, card))
        print(profile_markdown(rows, card))
        return 0
    if args.target == "report":
        parts = []
        for path in args.parts:  # a part file, or an earlier merged report (its parts are kept)
            data = json.loads(path.read_text())
            parts += data["parts"] if "parts" in data else [data]
        result = {"parts": parts, "targets": targets(parts)}
        machine = args.machine or parts[0]["machine"]["gpu"].replace(" ", "-").lower()
        markdown = gpu_markdown(result)
    else:
        result = {"machine": machine_info("cpu"), **bench_cpu(args.reps, log)}
        machine = args.machine or "cpu"
        markdown = cpu_markdown(result)
        result["seconds"] = round(time.perf_counter() - started, 1)
    (args.out / f"results-{machine}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"results-{machine}.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
