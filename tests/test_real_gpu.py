"""Real low-bit paths on a CUDA GPU: int8 and fp8 W8A8, weight-only int8 / packed int4 (Triton).

Skipped where there is no CUDA device (CI). Tolerances: int8 is exact in the integer codes, so it
matches a float64 simulation to float32 rounding; fp8 re-encodes on the e4m3 grid (3 mantissa bits);
weight-only paths compute in bf16 where the simulation rounds the dequantized weight to bf16 first.
The objectives of `to_real` (speed: timed candidates; memory: fewest weight bits) meet the same bounds.
"""

import copy

import pytest
import torch

from conftest import assert_int8_exact, compiled_ffn_launches, layer_errors, random_llamagen
from quantcore.calib import CalibrationSpec, build_calibration_set
from quantcore.fastgen import generate_tokens
from quantcore.pipeline import quantize
from quantcore.quant.real import to_real
from quantcore.recipe import Recipe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
# Per converted path: max |real - sim64| / max |sim64| per layer.
TOLERANCE = {"int8-gpu": 2e-3, "fp8-gpu": 8e-2, "w8-gpu": 2e-2, "w4-gpu": 2e-2, "dequantized": 2e-2}


def _quantized(w_bits, a_bits, dtype=torch.float32):
    fp = random_llamagen("llamagen-tiny", std=0.3)
    calib = build_calibration_set(fp, CalibrationSpec(num_samples=8, batch_size=8), {"cfg_scale": 2.0})
    model = copy.deepcopy(fp)
    quantize(model, Recipe.preset("ptq4arvg" if a_bits else "rtn", w_bits, a_bits), calib)
    return model.to("cuda", dtype), calib


@pytest.mark.parametrize("w8a8", ["int8", "fp8"])
def test_w8a8_layers_agree_with_simulation(w8a8):
    sim, calib = _quantized(8, 8)
    if w8a8 == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs sm_89+")
    real = copy.deepcopy(sim)
    report = to_real(real, w8a8=w8a8)
    paths = {e["path"] for e in report.values()}
    assert f"{w8a8}-gpu" in paths
    errors = layer_errors(sim, real, report, calib)
    if w8a8 == "int8":
        assert_int8_exact(errors, 1e-5, TOLERANCE["int8-gpu"])
    else:
        assert max(errors.values()) < TOLERANCE["fp8-gpu"], errors
    classes, seeds = torch.arange(8, device="cuda") % 10, list(range(8))
    ref = generate_tokens(sim, classes, seeds, cfg_scale=2.0)
    got = generate_tokens(real, classes, seeds, cfg_scale=2.0)
    agreement = float((ref == got).float().mean())
    # int8 is exact; fp8 is another grid, and sampling on a random tiny model amplifies any change
    # (0.24 seen on an H200; chance is 1/64)
    assert agreement >= (0.99 if w8a8 == "int8" else 0.1), agreement


FP8_SCALE_PASS = pytest.mark.xfail(
    strict=True,
    reason="seen on an H100 (2026-12-07): 4 kernels + 3 _scaled_mm against bf16's 3 + 3; by the kernels' "
    "names the extra one computes w2's per-row e4m3 scales (gathered by position) beside the SiLU x "
    "kernel that writes w2's codes",
)


@pytest.mark.parametrize(  # int8 past the fused decode kernel
    ("w8a8", "rows"), [pytest.param("fp8", 4, marks=FP8_SCALE_PASS), ("int8", 128)]
)
def test_compiled_w8a8_launches_no_more_than_bf16(w8a8, rows):
    """As on the CPU (tests/test_real.py): the norm writes the 8-bit codes, the epilogues fuse forward;
    counted as launches, generated kernels and GEMM calls together."""
    if w8a8 == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs sm_89+")
    real, _ = _quantized(8, 8, torch.bfloat16)
    to_real(real, w8a8=w8a8)
    bf16 = random_llamagen("llamagen-tiny", std=0.3).to("cuda", torch.bfloat16)
    bf16_launches, (kernels, gemms) = compiled_ffn_launches(bf16, rows), compiled_ffn_launches(real, rows)
    assert len(kernels) + len(gemms) <= sum(map(len, bf16_launches)), (bf16_launches, kernels, gemms)
    norm = [k for k in kernels if "rsqrt" in k]
    assert len(norm) == 1 and "clamp" in norm[0], norm


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_kernels_agree_with_simulation(bits):
    pytest.importorskip("triton")
    sim, calib = _quantized(bits, None, torch.bfloat16)
    real = copy.deepcopy(sim)
    report = to_real(real)
    assert {e["path"] for e in report.values()} == {f"w{bits}-gpu"}
    errors = layer_errors(sim, real, report, calib)
    assert max(errors.values()) < TOLERANCE[f"w{bits}-gpu"], errors


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m", [1, 2, 17, 64, 200])
@pytest.mark.parametrize("with_bias", [False, True])
def test_weight_only_kernel_matches_reference_at_odd_shapes(bits, m, with_bias):
    pytest.importorskip("triton")
    import quantcore.kernels.wo_gemm  # noqa: F401
    from quantcore.quant.real import pack_codes

    n, k = 328, 1280
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    codes = torch.randint(0, 2**bits, (n, k), device="cuda", dtype=torch.int32)
    zp = torch.randint(0, 2**bits, (n,), device="cuda", dtype=torch.int32)
    scale = torch.rand(n, device="cuda") * 0.01 + 1e-3
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) if with_bias else None
    offset = 128 if bits == 8 else 0  # 8-bit codes are stored centred into int8
    stored = (codes - offset).to(torch.int8) if bits == 8 else pack_codes(codes.to(torch.uint8), 4)
    out = torch.ops.quantcore.wo_linear(x, stored, (zp - offset).float(), scale, bias, bits)
    ref = (x.double() @ (codes - zp[:, None]).double().T) * scale.double()
    if bias is not None:
        ref = ref + bias.double()
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert float((out.double() - ref).norm() / ref.norm()) < 8e-3  # the bf16 output rounding


@pytest.mark.parametrize("m", [1, 2, 16, 33, 64])
@pytest.mark.parametrize("a_bits", [8, 6])
def test_fused_w8a8_kernel_is_the_integer_gemm(m, a_bits):
    pytest.importorskip("triton")
    import quantcore.kernels.wo_gemm  # noqa: F401

    n, k, n_pad, k_pad = 200, 328, 8, 8  # Int8Linear's padded storage is read in place
    x = torch.randn(m, k, device="cuda") * 3
    x_scale = torch.rand(m, device="cuda") * 0.05 + 0.01
    x_zp = torch.randint(0, 2**a_bits, (m,), device="cuda").float()
    codes = torch.randint(-128, 128, (n, k), device="cuda", dtype=torch.int32)
    w_zp = torch.randint(-128, 128, (n,), device="cuda").float()
    w_scale = torch.rand(n, device="cuda") * 0.01
    stored = torch.nn.functional.pad(codes, (0, k_pad, 0, n_pad)).to(torch.int8)
    out = torch.ops.quantcore.a8_linear(x, x_scale, x_zp, stored, w_zp, w_scale, None, n, a_bits)
    q = torch.clamp(torch.round(x / x_scale[:, None]) + x_zp[:, None], 0, 2**a_bits - 1) - x_zp[:, None]
    ref = (
        (q.double() @ (codes.double() - w_zp.double()[:, None]).T)
        * x_scale.double()[:, None]
        * w_scale.double()
    )
    assert out.shape == (m, n)
    assert float((out.double() - ref).norm() / ref.norm()) < 8e-3  # the bf16 output rounding


def _candidates(layer, weight_only: bool) -> set[str]:
    """The paths the speed objective must have timed for `layer` (plan_layer's rules, spelled out)."""
    if weight_only:
        return {"dequantized", "w8-gpu"} | ({"w4-gpu"} if layer.in_features % 2 == 0 else set())
    multiples_of_16 = layer.in_features % 16 == 0 and layer.out_features % 16 == 0
    fp8 = torch.cuda.get_device_capability() >= (8, 9) and multiples_of_16
    return {"dequantized", "int8-gpu"} | ({"fp8-gpu"} if fp8 else set())


@pytest.mark.parametrize(("w_bits", "a_bits", "dtype"), [(8, 8, torch.float32), (4, None, torch.bfloat16)])
def test_speed_objective_times_every_candidate_and_keeps_none_slower_than_dequantized(w_bits, a_bits, dtype):
    pytest.importorskip("triton")
    sim, calib = _quantized(w_bits, a_bits, dtype)
    real = copy.deepcopy(sim)
    report = to_real(real, objective="speed")
    linears = {n: e for n, e in report.items() if "matmul" not in n}
    assert linears
    for name, entry in linears.items():
        times = entry["timings_ms"]
        assert entry["objective"] == "speed" and entry["rows"] == 64
        assert set(times) == _candidates(sim.get_submodule(name), a_bits is None), name
        assert all(ms > 0 for ms in times.values())
        assert times[entry["path"]] <= times["dequantized"], entry
        if entry["path"] == "dequantized":
            assert entry["reason"].startswith("no low-bit kernel faster than the dequantized"), entry
    errors = layer_errors(sim, real, report, calib)
    assert all(errors[n] < TOLERANCE[report[n]["path"]] for n in errors), errors


@pytest.mark.parametrize(
    ("w_bits", "a_bits", "dtype", "path"),
    [(4, None, torch.bfloat16, "w4-gpu"), (8, 8, torch.float32, "int8-gpu")],
)
def test_memory_objective_keeps_the_fewest_weight_bits(w_bits, a_bits, dtype, path):
    pytest.importorskip("triton")
    sim, calib = _quantized(w_bits, a_bits, dtype)
    real = copy.deepcopy(sim)
    report = to_real(real, objective="memory")
    linears = {n: e for n, e in report.items() if "matmul" not in n}
    assert {e["path"] for e in linears.values()} == {path}  # W8A8: int8 and fp8 tie, int8 is the default
    assert all(e["objective"] == "memory" and "timings_ms" not in e for e in linears.values())
    errors = layer_errors(sim, real, report, calib)
    assert len(errors) == len(linears) and max(errors.values()) < TOLERANCE[path], errors


# ---------------------------------------------------------------------------------------------------
# The fused cached-attention kernel (quantcore/kernels/attention.py)
# ---------------------------------------------------------------------------------------------------

# max |kernel - reference| / max |reference|; the reference takes the same bf16 operands in fp32.
# One pass rounds the unnormalized probabilities to bf16 for the tensor cores; with a probability
# quantizer a few probabilities move across a code boundary (one step of the grid each).
ATTENTION_TOLERANCE = {0: 1e-2, 1: 3e-2, 2: 5e-2}  # by probability quantizer kind, against fp32 scores
# against the matmul path, which rounds the scores to bf16 where the kernel keeps fp32: with unquantized
# probabilities (and bf16 queries) that rounding alone made 0.020 (convert) / 0.022 (prmt) on tiny-llamagen
# on an H100 (2026-12-07)
MATMUL_PATH_TOLERANCE = {**ATTENTION_TOLERANCE, 0: 3e-2}


def _attention_reference(q, kc, vc, qpos, kv_len, causal, scale, kv, p_kind, p):
    from quantcore.quant.quantizer import dequantize_codes, fake_quant, log_sqrt2_quant

    k, v = kc[: q.shape[0], :, :kv_len], vc[: q.shape[0], :, :kv_len]
    if kc.dtype == torch.uint8:
        k, v = (dequantize_codes(c, s, z).to(q.dtype) for c, s, z in ((k, kv[0], kv[1]), (v, kv[2], kv[3])))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1).float(), v.repeat_interleave(group, 1).float()
    s = q.float() @ k.transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(torch.arange(kv_len, device=q.device)[None] > qpos[:, None], float("-inf"))
    probs = torch.softmax(s, -1).to(q.dtype).float()
    if p_kind == 1:
        probs = fake_quant(probs, torch.tensor(p[0]), torch.tensor(p[1]), 8).to(q.dtype).float()
    if p_kind == 2:
        probs = log_sqrt2_quant(probs, torch.tensor(p[0]), 8).to(q.dtype).float()
    return probs @ v


def test_an_artifact_converts_on_the_cpu_and_the_gpu_gets_only_the_runtime_form(tmp_path):
    from quantcore.api import load_generator, quantize_job
    from quantcore.artifact import load_artifact
    from quantcore.quant.modules import QuantLinear
    from quantcore.quant.real import RealQuantLinear

    spec = {
        "model": "llamagen-tiny",
        "recipe": "ptq4arvg",
        "calibration": {"num_samples": 4, "batch_size": 4},
    }
    quantize_job({**spec, "evaluation": {"num_images": 0}}, tmp_path / "a", device="cpu")
    generator = load_generator(str(tmp_path / "a"), device="cuda", objective="memory")
    model = generator.model
    real = [m for m in model.modules() if isinstance(m, RealQuantLinear)]
    assert real and not any(isinstance(m, QuantLinear) for m in model.modules())  # no float weight kept
    assert all(t.is_cuda for t in [*model.parameters(), *(b for b in model.buffers() if b is not None)])
    on_gpu, _, _ = load_artifact(tmp_path / "a", "cuda")  # the float model on the GPU, converted there
    to_real(on_gpu, objective="memory")
    classes = torch.tensor([1, 2], device="cuda")
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0)).cuda()
    torch.testing.assert_close(
        model.sequence_logits(classes, tokens), on_gpu.sequence_logits(classes, tokens), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "b,h,kv_heads,t,length,kv_len,causal,codes,p_kind",
    [
        (2, 20, 20, 1, 577, 577, True, True, 0),  # LlamaGen decode, 8-bit cache
        (1, 16, 16, 1, 577, 300, True, False, 0),  # bf16 cache, keys split over programs
        (4, 8, 2, 1, 257, 257, True, True, 1),  # grouped KV heads, uniform probabilities
        (3, 4, 4, 2, 100, 100, True, True, 2),  # RAR's two-token prefix, log-sqrt2 probabilities
        (2, 16, 16, 100, 680, 424, False, True, 1),  # a VAR scale: every cached key visible
        (64, 16, 16, 1, 577, 577, True, True, 1),  # serving batch: one split per query
        (24, 16, 16, 256, 680, 680, False, True, 0),  # VAR's last scale at a batch: written without combine
        (24, 16, 16, 169, 680, 424, False, False, 1),  # the same over bf16, two passes, a partial query block
    ],
)
@pytest.mark.parametrize("decode", ["convert", "fp16-bits", "prmt"])  # every way to read the codes
def test_cached_attention_kernel_matches_reference(
    b, h, kv_heads, t, length, kv_len, causal, codes, p_kind, decode, monkeypatch
):
    pytest.importorskip("triton")
    import quantcore.kernels.attention as attention

    monkeypatch.setattr(attention, "DECODE", attention.DECODES.index(decode))

    g = torch.Generator(device="cuda").manual_seed(0)
    d = 64
    q = torch.randn(b, h, t, d, device="cuda", generator=g).to(torch.bfloat16)
    shape = (b + 1, kv_heads, length, d)  # a larger cache than the batch, as the plans allocate
    if codes:
        kc, vc = (torch.randint(0, 256, shape, device="cuda", dtype=torch.uint8, generator=g) for _ in "kv")
    else:
        kc, vc = (torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16) for _ in "kv")
    kv = [0.02, 128.0, 0.03, 120.0]
    p = [1 / 255, 0.0, 255.0] if p_kind == 1 else [1.0, 0.0, 256.0]
    qpos = torch.arange(kv_len - t, kv_len, device="cuda")
    got = torch.ops.quantcore.cached_attention(q, kc, vc, qpos, kv_len, causal, 0.125, kv, p_kind, p)
    ref = _attention_reference(q, kc, vc, qpos, kv_len, causal, 0.125, kv, p_kind, p)
    err = float((got.float() - ref).abs().max() / ref.abs().max())
    assert err < ATTENTION_TOLERANCE[p_kind], err


class _Twin:
    """A layer's fused kernel that also runs the layer's matmul path on the same inputs, every call:
    a teacher-forced comparison (each call sees the cache the kernel's own decoding wrote)."""

    def __init__(self, module, kernel):
        self.module, self.kernel, self.errors = module, kernel, []

    def __call__(self, q, k_cache, v_cache, pos, kv_len, causal, sm_scale):
        from quantcore.nn import read_kv

        out = self.kernel(q, k_cache, v_cache, pos, kv_len, causal, sm_scale)
        m = self.module
        k, v = read_kv(m, q.shape[0], kv_len, q.dtype)
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = m.matmul_qk(q, k.transpose(-2, -1)) * sm_scale
        if causal:
            hidden = torch.arange(kv_len, device=q.device)[None] > pos[:, None]
            scores = scores.masked_fill(hidden, float("-inf"))
        ref = m.matmul_pv(torch.softmax(scores.float(), dim=-1).type_as(q), v)
        self.errors.append(float((out.float() - ref.float()).abs().max() / ref.float().abs().max()))
        return out


@pytest.mark.parametrize("name", ["tiny-llamagen", "tiny-rar", "tiny-var"])
@pytest.mark.parametrize("attention", [True, "kv"])
def test_fused_attention_computes_what_the_matmul_path_computes(name, attention):
    """The real bf16 model decoding with the fused kernel; at every call of every layer, the kernel's
    output against the layer's matmul path (the recipe's simulated numerics) on the same inputs. Then
    the same decoding replayed from a CUDA graph gives the same tokens."""
    pytest.importorskip("triton")
    from quantcore.fastgen import FastSampler
    from quantcore.models import bind_tokenizer
    from quantcore.registry import get_spec, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(name, device="cuda")
    model = model.to(torch.bfloat16)
    bind_tokenizer(model, tokenizer.float())  # VAR's scale inputs come from the fp32 VQ-VAE
    sampling = get_spec(name).entry.sampling.to_dict()
    calib = build_calibration_set(model, CalibrationSpec(num_samples=8, batch_size=8), sampling)
    recipe = Recipe.preset("ptq4arvg", 8, 8).model_copy(update={"quantize_attention": attention})
    quantize(model, recipe, calib)
    report = to_real(model)
    decode = {e["decode"] for n, e in report.items() if n.endswith("matmul_qk")}
    assert decode == {"fused kernel"}, decode
    classes, seeds = torch.arange(8, device="cuda") % 10, list(range(8))
    layers = [m for m in model.modules() if getattr(m, "fused_attention", None) is not None]
    twins = [_Twin(m, m.fused_attention) for m in layers]
    for twin in twins:
        twin.module.fused_attention = twin
    stepped = FastSampler(model, 8, sampling, graph=False).generate(classes, seeds)
    for twin in twins:
        twin.module.fused_attention = twin.kernel
    errors = [e for twin in twins for e in twin.errors]
    assert errors and all(twin.errors for twin in twins)
    # scores stay fp32 in the kernel where the matmul path rounds them to bf16; a probability code
    # can then move by one step of its grid
    p_kind = twins[0].kernel.p_kind
    assert max(errors) < MATMUL_PATH_TOLERANCE[p_kind], (max(errors), p_kind)
    graphed = FastSampler(model, 8, sampling, graph=True).generate(classes, seeds)
    assert torch.equal(graphed, stepped)
