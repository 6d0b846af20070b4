"""Speed of real low-bit execution: end-to-end LlamaGen token generation and per-GEMM roofline.

    PYTHONPATH=. python bench/speed/run.py gpu --out bench/speed      # on a CUDA machine
    PYTHONPATH=. python bench/speed/run.py cpu --out bench/speed      # on the CPU machine

GPU: full-size LlamaGen-B/L/XL with random weights (speed does not depend on the values), class-
conditional generation with CFG (2B rows per step) at several batch sizes, for bf16, W8A8 fp8, W8A8
int8, weight-only W8 and W4. Every variant runs the same decode step, captured once per batch size in
a CUDA graph (static KV cache, one step = model + CFG + sampling + next embedding, no host sync), so
the numbers compare GEMM paths, not Python launch overhead. Sampling uses Gumbel-max on the GPU: the
same distribution as the library's sampler, without its per-image CPU generators.

Quantized variants get synthetic calibrated parameters (per-row min/max weights; STWQ group tables on
block inputs and a per-tensor head input, as the ptq4arvg recipe produces) and go through
`quantcore.quant.real.to_real`, exactly as an artifact would. Attention matmuls and the KV cache stay
bf16 in every variant.

CPU: the tiny registry models, calibrated by the engine itself (ptq4arvg W8A8), fp32 vs simulated vs
int8 `torch._int_mm`, plus per-GEMM fp32 vs int8 timings. Fastest of several repeats (shared cores).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch.nn import functional as F

from quantcore.models.llamagen import MODELS, LlamaGen, generate_tokens, quant_layout
from quantcore.quant.modules import QuantLinear, make_act_quantizer, swap_module
from quantcore.quant.quantizer import params_from_range
from quantcore.quant.real import summarize, to_real

GPU_MODELS = ("llamagen-b", "llamagen-l", "llamagen-xl")
GPU_VARIANTS = ("bf16", "w8a8-fp8", "w8a8-int8", "w8", "w4")
# Datasheet dense peaks (H100 SXM); the measured copy bandwidth replaces the HBM figure at run time.
PEAK_TFLOPS = {"bf16": 989.0, "int8": 1979.0, "fp8": 1979.0, "w8": 989.0, "w4": 989.0}


# ---------------------------------------------------------------------------------------------------
# Models with synthetic calibrated parameters
# ---------------------------------------------------------------------------------------------------


def random_model(name: str, device: str, dtype: torch.dtype, seed: int = 0) -> LlamaGen:
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaGen(MODELS[name].config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    return model.to(device, dtype).eval()


@torch.no_grad()
def synthetic_quantize(model: LlamaGen, w_bits: int, a_bits: int | None) -> None:
    """QuantLinears with the parameter shapes the ptq4arvg recipe produces, without calibration data."""
    layout = quant_layout(model)
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


def build_variant(name: str, variant: str, device: str) -> tuple[LlamaGen, dict]:
    model = random_model(name, device, torch.bfloat16)
    if variant == "bf16":
        return model, {}
    bits = {"w8a8-fp8": (8, 8), "w8a8-int8": (8, 8), "w8": (8, None), "w4": (4, None)}[variant]
    synthetic_quantize(model, *bits)
    w8a8 = "fp8" if variant == "w8a8-fp8" else "int8"
    report = to_real(model, w8a8=w8a8)
    torch.cuda.empty_cache()
    return model, report


def model_bytes(model: torch.nn.Module) -> int:
    tensors = [*model.parameters(), *(b for b in model.buffers() if b is not None)]
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------------------------------------
# GPU: graph-captured decoding
# ---------------------------------------------------------------------------------------------------


class GraphedSampler:
    """One CUDA graph = one decode step for `batch` images with CFG; replayed num_tokens times."""

    def __init__(self, model: LlamaGen, batch: int, cfg_scale: float):
        cfg = model.config
        self.model, self.batch, self.cfg_scale = model, batch, cfg_scale
        dev = model.rope.device
        self.rows = 2 * batch
        model.setup_caches(self.rows, torch.bfloat16)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.h = torch.zeros(self.rows, 1, cfg.dim, dtype=torch.bfloat16, device=dev)
        self.tokens = torch.zeros(batch, cfg.num_tokens, dtype=torch.long, device=dev)
        self.classes = torch.arange(batch, device=dev) % cfg.num_classes
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture: cuBLAS handles, Triton compiles
            for _ in range(2):
                self.reset()
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        self.reset()
        with torch.cuda.graph(self.graph):
            self._step()

    def _step(self) -> None:
        m = self.model
        pos = self.pos
        rope, mask, h = m.rope[pos], m.mask[pos], self.h
        for layer in m.layers:
            h = layer(h, pos, rope, mask, True)
        logits = m.output(m.norm(h), pos).float()[:, -1]
        cond, uncond = logits.chunk(2)
        guided = uncond + (cond - uncond) * self.cfg_scale
        # Gumbel-max: argmax(l + G) is a draw from softmax(l), with no host sync.
        gumbel = -torch.log(-torch.log(torch.rand_like(guided).clamp_(min=1e-20)))
        tok = (guided + gumbel).argmax(-1)
        self.tokens.index_copy_(1, pos, tok[:, None])
        self.h.copy_(m.tok_embeddings(torch.cat([tok, tok]))[:, None])
        pos.add_(1)

    def reset(self) -> None:
        m = self.model
        null = torch.full_like(self.classes, m.null_class)
        self.h.copy_(m.cls_embedding.embedding_table(torch.cat([self.classes, null]))[:, None])
        self.pos.zero_()

    def generate(self) -> torch.Tensor:
        self.reset()
        for _ in range(self.model.config.num_tokens):
            self.graph.replay()
        return self.tokens


def time_generation(sampler: GraphedSampler, reps: int) -> float:
    sampler.generate()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sampler.generate()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_end_to_end(models, variants, batches, reps, log, deadline: float, save) -> list[dict]:
    rows = []
    for name in models:
        cfg_scale = MODELS[name].sampling.cfg_scale
        for variant in variants:
            if time.perf_counter() > deadline:
                rows.append({"model": name, "variant": variant, "error": "skipped: out of the call's time"})
                continue
            t0 = time.perf_counter()
            model, report = build_variant(name, variant, "cuda")
            built = time.perf_counter() - t0
            for batch in batches:
                torch.cuda.reset_peak_memory_stats()
                try:  # one failing configuration is recorded, the rest still run
                    sampler = GraphedSampler(model, batch, cfg_scale)
                    latency = time_generation(sampler, reps)
                except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
                    rows.append({"model": name, "variant": variant, "batch": batch, "error": str(exc)[:300]})
                    log(f"{name} {variant} {batch}: {exc}")
                    model.clear_caches()
                    continue
                row = {
                    "model": name,
                    "variant": variant,
                    "batch": batch,
                    "tokens": model.config.num_tokens,
                    "latency_s": round(latency, 4),
                    "images_per_s": round(batch / latency, 2),
                    "ms_per_step": round(1e3 * latency / model.config.num_tokens, 4),
                    "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                    "model_gib": round(model_bytes(model) / 2**30, 3),
                    "paths": summarize(report) if report else {"bf16": len(quant_layout(model).all_linears)},
                    "build_s": round(built, 1),
                }
                rows.append(row)
                log(json.dumps(row))
                save(rows)
                del sampler
                model.clear_caches()
                torch.cuda.empty_cache()
            del model
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------------
# GPU: per-GEMM timings against the roofline
# ---------------------------------------------------------------------------------------------------


def linear_shapes(name: str) -> dict[str, tuple[int, int]]:
    cfg = MODELS[name].config
    return {
        "wqkv": (cfg.dim, 3 * cfg.dim),
        "wo": (cfg.dim, cfg.dim),
        "w1/w3": (cfg.dim, cfg.ffn_hidden),
        "w2": (cfg.ffn_hidden, cfg.dim),
        "output": (cfg.dim, cfg.vocab_size),
    }


def measure_bandwidth() -> float:
    """Device-to-device copy bandwidth, bytes read + written per second."""
    from triton.testing import do_bench

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def bench_gemms(models, rows_list, bandwidth, log) -> list[dict]:
    from triton.testing import do_bench

    from quantcore.kernels.wo_gemm import wo_gemm
    from quantcore.quant.real import pack_codes

    out = []
    seen = set()
    for name in models:
        for layer, (k, n) in linear_shapes(name).items():
            if (k, n) in seen:
                continue
            seen.add((k, n))
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            wi8 = torch.randint(-128, 128, (n, k), device="cuda", dtype=torch.int8)
            w4 = pack_codes(torch.randint(0, 16, (n, k), device="cuda", dtype=torch.uint8), 4)
            wf8 = w.to(torch.float8_e4m3fn)
            sw = torch.ones(1, n, device="cuda")
            for m in rows_list:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                xi8 = torch.randint(-128, 128, (max(m, 32), k), device="cuda", dtype=torch.int8)
                xf8 = x.to(torch.float8_e4m3fn)
                sx = torch.ones(m, 1, device="cuda")
                fns = {  # (call, weight bytes per element, output bytes per element)
                    "bf16": (partial(F.linear, x, w), 2, 2),
                    "int8": (partial(torch._int_mm, xi8, wi8.t()), 1, 4),
                    "fp8": (partial(torch._scaled_mm, xf8, wf8.t(), sx, sw, out_dtype=torch.bfloat16), 1, 2),
                    "w8": (partial(wo_gemm, x, wi8, 8), 1, 4),
                    "w4": (partial(wo_gemm, x, w4, 4), 0.5, 4),
                }
                for kind, (fn, w_bytes, out_bytes) in fns.items():
                    try:
                        ms = do_bench(fn, warmup=10, rep=50, return_mode="median")
                    except RuntimeError as exc:  # a shape a library kernel refuses is a result too
                        out.append(
                            {
                                "model": name,
                                "layer": layer,
                                "M": m,
                                "K": k,
                                "N": n,
                                "kind": kind,
                                "error": str(exc)[:200],
                            }
                        )
                        continue
                    a_bytes = 1 if kind in ("int8", "fp8") else 2
                    moved = m * k * a_bytes + n * k * w_bytes + m * n * out_bytes
                    flops = 2 * m * k * n
                    floor = max(moved / bandwidth, flops / (PEAK_TFLOPS[kind] * 1e12))
                    row = {
                        "model": name,
                        "layer": layer,
                        "M": m,
                        "K": k,
                        "N": n,
                        "kind": kind,
                        "us": round(ms * 1e3, 2),
                        "floor_us": round(floor * 1e6, 2),
                        "of_roofline": round(floor / (ms * 1e-3), 3),
                        "TFLOPs": round(flops / (ms * 1e-3) / 1e12, 1),
                        "GBps": round(moved / (ms * 1e-3) / 1e9, 1),
                    }
                    out.append(row)
            log(f"gemm {name} {layer} K={k} N={n} done")
    return out


def check_paths(log) -> dict:
    """Relative error of every real path against simulation on LlamaGen-B layers, before any timing."""
    x = torch.randn(1, 64, MODELS["llamagen-b"].config.dim, device="cuda", dtype=torch.bfloat16)
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
            inp = (
                x
                if layer == "attention.wqkv"
                else torch.randn(1, 64, sim.config.ffn_hidden, device="cuda", dtype=torch.bfloat16)
            )
            ref = sim.layers[0].get_submodule(layer)(inp, pos).double()
            got = real.layers[0].get_submodule(layer)(inp, pos).double()
            errs.append(float((got - ref).norm() / ref.norm()))
        result[label] = max(errs)
        del sim, real
    log(f"path check, relative error vs simulation: {result}")
    return result


# ---------------------------------------------------------------------------------------------------
# CPU
# ---------------------------------------------------------------------------------------------------


def cpu_best(fn, reps: int) -> float:
    """Fastest of `reps` runs: on a shared 2-core machine the other runs measure the neighbours."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_cpu(reps: int, log) -> dict:
    from quantcore.calib import CalibrationSpec, build_calibration_set
    from quantcore.pipeline import quantize
    from quantcore.recipe import Recipe

    rows = []
    for name in ("llamagen-tiny", "par-tiny"):
        fp = random_model(name, "cpu", torch.float32)
        with torch.no_grad():
            for p in fp.parameters():
                p.normal_(0.0, 0.3)
        calib = build_calibration_set(fp, CalibrationSpec(num_samples=8, batch_size=8), {"cfg_scale": 2.0})
        sim = copy.deepcopy(fp)
        quantize(sim, Recipe.preset("ptq4arvg", 8, 8), calib)
        real = copy.deepcopy(sim)
        report = to_real(real)
        for batch in (1, 8, 32):
            classes, seeds = torch.arange(batch) % 10, list(range(batch))
            times, tokens = {}, {}
            for label, model in (("fp32", fp), ("simulated", sim), ("int8", real)):
                times[label] = cpu_best(partial(generate_tokens, model, classes, seeds, cfg_scale=2.0), reps)
                tokens[label] = generate_tokens(model, classes, seeds, cfg_scale=2.0)
            row = {
                "model": name,
                "batch": batch,
                **{f"{k}_s": round(v, 4) for k, v in times.items()},
                "int8_vs_fp32": round(times["fp32"] / times["int8"], 3),
                "token_agreement_int8_vs_simulated": float(
                    (tokens["int8"] == tokens["simulated"]).float().mean()
                ),
                "paths": summarize(report),
            }
            rows.append(row)
            log(json.dumps(row))
    gemms = []
    for m in (2, 16, 64, 256):
        for k, n in ((256, 768), (1024, 1024), (1024, 4096)):
            x = torch.randn(m, k)
            w = torch.randn(n, k)
            xi, wi = (
                torch.randint(-128, 128, (m, k), dtype=torch.int8),
                torch.randint(-128, 128, (n, k), dtype=torch.int8),
            )
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
    }
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    info["cpu"] = cpu
    if kind == "gpu":
        import triton

        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "sms": props.multi_processor_count, "cuda": torch.version.cuda}
        info["triton"] = triton.__version__
        info["gpu_mem_gib"] = round(props.total_memory / 2**30, 1)
    return info


def gpu_markdown(result: dict) -> str:
    info = result["machine"]
    lines = [
        f"# Real low-bit execution: GPU speed ({info['gpu']})",
        "",
        f"{info['gpu']} ({info['sms']} SMs), torch {info['torch']}, CUDA {info['cuda']}, Triton {info['triton']}, "
        f"{info['date']}. Random weights; CFG on (2 x batch rows per step); every variant is the same "
        "decode step captured in a CUDA graph. bf16 is eager + CUDA graph (no torch.compile: its compile "
        "time per model and batch does not fit a 10-minute device call). Attention and the KV cache are "
        f"bf16 in every variant. Measured copy bandwidth {result['bandwidth_TBps']:.2f} TB/s.",
        "",
        f"Path check (relative error vs simulation, LlamaGen-B layer 0 wqkv and w2): {result['path_check']}",
        "",
        "## End to end: latency (s per batch) and speedup over bf16",
        "",
        "| model | batch | "
        + " | ".join(GPU_VARIANTS)
        + " | "
        + " | ".join(f"x {v}" for v in GPU_VARIANTS[1:])
        + " |",
        "|" + "---|" * (2 + 2 * len(GPU_VARIANTS) - 1),
    ]
    e2e = result["end_to_end"]
    keys = sorted({(r["model"], r["batch"]) for r in e2e}, key=lambda t: (GPU_MODELS.index(t[0]), t[1]))
    for model, batch in keys:
        by = {
            r["variant"]: r for r in e2e if r["model"] == model and r["batch"] == batch and "error" not in r
        }
        base = by.get("bf16", {}).get("latency_s")
        lat = [f"{by[v]['latency_s']:.3f}" if v in by else "-" for v in GPU_VARIANTS]
        ratio = [f"{base / by[v]['latency_s']:.2f}" if v in by and base else "-" for v in GPU_VARIANTS[1:]]
        lines.append(f"| {model} | {batch} | " + " | ".join(lat) + " | " + " | ".join(ratio) + " |")
    lines += ["", "## Images/s and peak GPU memory (GiB; model + KV cache GiB in brackets)", ""]
    lines += ["| model | batch | " + " | ".join(GPU_VARIANTS) + " |", "|" + "---|" * (2 + len(GPU_VARIANTS))]
    for model, batch in keys:
        by = {
            r["variant"]: r for r in e2e if r["model"] == model and r["batch"] == batch and "error" not in r
        }
        cells = [
            f"{by[v]['images_per_s']:.1f} img/s, {by[v]['peak_mem_gib']:.2f} ({by[v]['model_gib']:.2f})"
            if v in by
            else "-"
            for v in GPU_VARIANTS
        ]
        lines.append(f"| {model} | {batch} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Per GEMM (us, median, L2 flushed) and share of the roofline floor",
        "",
        "floor = max(bytes / measured bandwidth, FLOPs / datasheet peak); `of_roofline` = floor / time.",
        "",
        "| model | layer | M | K | N | bf16 | int8 | fp8 | w8 | w4 | best 8-bit vs bf16 | bf16 of roofline | w4 of roofline |",
        "|" + "---|" * 13,
    ]
    g = [r for r in result["gemms"] if "error" not in r]
    for key in sorted(
        {(r["model"], r["layer"], r["M"]) for r in g}, key=lambda t: (GPU_MODELS.index(t[0]), t[1], t[2])
    ):
        by = {r["kind"]: r for r in g if (r["model"], r["layer"], r["M"]) == key}
        any_row = next(iter(by.values()))
        best = min((by[k]["us"] for k in ("int8", "fp8", "w8") if k in by), default=None)
        cells = [f"{by[k]['us']:.1f}" if k in by else "err" for k in ("bf16", "int8", "fp8", "w8", "w4")]
        ratio = f"{by['bf16']['us'] / best:.2f}" if best and "bf16" in by else "-"
        roof = [f"{by[k]['of_roofline']:.2f}" if k in by else "-" for k in ("bf16", "w4")]
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {any_row['K']} | {any_row['N']} | "
            + " | ".join(cells)
            + f" | {ratio} | {roof[0]} | {roof[1]} |"
        )
    return "\n".join(lines) + "\n"


def cpu_markdown(result: dict) -> str:
    info = result["machine"]
    lines = [
        "# Real low-bit execution: CPU speed",
        "",
        f"{info['cpu']}, {info['threads']} threads, torch {info['torch']}, {info['date']}. Tiny registry "
        "models calibrated by the engine (ptq4arvg W8A8); fastest of repeats (the 2 cores are shared with "
        "other engineers' test runs, so slower repeats measure them); ratios within one run are what count.",
        "",
        "| model | batch | fp32 s | simulated s | int8 s | int8 vs fp32 | token agreement int8 vs simulated |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["end_to_end"]:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['fp32_s']:.3f} | {r['simulated_s']:.3f} | {r['int8_s']:.3f} | "
            f"{r['int8_vs_fp32']:.2f}x | {r['token_agreement_int8_vs_simulated']:.3f} |"
        )
    lines += [
        "",
        "| M | K | N | fp32 us | int8 us | int8 speedup | int8 GOP/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["gemms"]:
        lines.append(
            f"| {r['M']} | {r['K']} | {r['N']} | {r['fp32_us']} | {r['int8_us']} | {r['int8_speedup']}x | {r['int8_GOPs']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=("gpu", "cpu"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--machine", default=None, help="name in the result files (default: gpu/cpu model)")
    parser.add_argument("--models", default=",".join(GPU_MODELS))
    parser.add_argument("--variants", default=",".join(GPU_VARIANTS))
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--budget-s", type=float, default=380, help="start no new GPU variant after this")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)

    torch.set_grad_enabled(False)
    info = machine_info(args.target)
    if args.target == "gpu":
        models = args.models.split(",")
        result = {"machine": info, "path_check": check_paths(log)}
        result["bandwidth_TBps"] = measure_bandwidth() / 1e12
        batches = [int(b) for b in args.batches.split(",")]
        result["gemms"] = bench_gemms(models, [2 * b for b in batches], result["bandwidth_TBps"] * 1e12, log)
        machine = args.machine or info["gpu"].replace(" ", "-").lower()
        partial_path = args.out / f"results-{machine}.partial.json"
        args.out.mkdir(parents=True, exist_ok=True)

        def save(rows):  # a call cut off at its limit still leaves the rows measured so far
            partial_path.write_text(json.dumps({**result, "end_to_end": rows}, indent=1))

        deadline = started + args.budget_s
        variants = args.variants.split(",")
        result["end_to_end"] = (
            []
            if args.skip_e2e
            else bench_end_to_end(models, variants, batches, args.reps, log, deadline, save)
        )
        partial_path.unlink(missing_ok=True)
        markdown = gpu_markdown(result)
    else:
        result = {"machine": info, **bench_cpu(args.reps, log)}
        machine = args.machine or "cpu-dev"
        markdown = cpu_markdown(result)
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"results-{machine}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"results-{machine}.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
