"""Real int8 execution on the CPU (`torch._int_mm`) against the simulated (fake-quant) path.

Tolerance: the int8 path computes sum_k (q_x - z_x)(q_w - z_w) exactly in int32 from the very codes
the simulation rounds to, so it differs from a float64 simulation only by the float32 rounding of
the final scale multiply: max |real - sim64| / max |sim64| <= 1e-6 per layer.
"""

import copy
import json
import shutil

import pytest
import torch

from conftest import assert_int8_exact, compiled_ffn_launches, layer_errors, random_llamagen
from quantcore.api import load_generator, quantize_job
from quantcore.artifact import load_artifact
from quantcore.calib import CalibrationSpec, build_calibration_set
from quantcore.cli import main as cli_main
from quantcore.errors import ConfigError
from quantcore.fastgen import generate_tokens
from quantcore.pipeline import quantize
from quantcore.quant.modules import QuantMatMul, iter_quant_modules
from quantcore.quant.real import (
    OBJECTIVES,
    Int8Linear,
    RealQuantLinear,
    _fastest,
    _smallest,
    pack_codes,
    to_real,
    unpack_codes,
)
from quantcore.recipe import Recipe

EXACT = 1e-6


@pytest.fixture(scope="module")
def calibrated():
    out = {}
    for name in ("llamagen-tiny", "par-tiny"):
        fp = random_llamagen(name, std=0.3)
        out[name] = (
            fp,
            build_calibration_set(fp, CalibrationSpec(num_samples=8, batch_size=8), {"cfg_scale": 2.0}),
        )
    return out


def _quantized(calibrated, name, preset="ptq4arvg", bits=(8, 8)):
    fp, calib = calibrated[name]
    model = copy.deepcopy(fp)
    quantize(model, Recipe.preset(preset, *bits), calib)
    return model, calib


@pytest.mark.parametrize("name", ["llamagen-tiny", "par-tiny"])
@pytest.mark.parametrize("bits", [(8, 8), (6, 6)])
def test_int8_layers_equal_simulation_and_tokens_agree(calibrated, name, bits):
    sim, calib = _quantized(calibrated, name, bits=bits)
    real = copy.deepcopy(sim)
    report = to_real(real)
    linears = {n for n, m in iter_quant_modules(sim) if not isinstance(m, QuantMatMul)}
    assert {n for n, e in report.items() if e["path"] == "int8-cpu"} == linears
    assert all(isinstance(real.get_submodule(n), Int8Linear) for n in linears)
    errors = layer_errors(sim, real, report, calib)
    assert len(errors) == len(linears)
    assert_int8_exact(errors, EXACT)
    classes, seeds = torch.arange(8) % 10, list(range(8))
    ref = generate_tokens(sim, classes, seeds, cfg_scale=2.0)
    got = generate_tokens(real, classes, seeds, cfg_scale=2.0)
    # Inputs agree to ~6e-7, so a value within that of a rounding midpoint (about one in 10^4) takes the
    # next code and its image diverges from that token on; a wrong kernel agrees on ~1/vocab of them.
    assert float((ref == got).float().mean()) >= 0.9


def test_static_group_tables_are_indexed_by_position(calibrated):
    sim, calib = _quantized(calibrated, "par-tiny")
    real = copy.deepcopy(sim)
    to_real(real)
    lin = real.layers[0].feed_forward.w2
    assert lin.input_quantizer.granularity == "group" and lin.input_quantizer.num_params > 2
    x = torch.randn(2, 3, lin.in_features)
    ref = sim.layers[0].feed_forward.w2
    for pos in (torch.tensor([0, 1, 2]), torch.tensor([9, 10, 11])):
        torch.testing.assert_close(lin(x, pos), ref(x, pos), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(lin(x, torch.tensor([0, 1, 2])), lin(x, torch.tensor([9, 10, 11])))


def test_layers_without_an_integer_form_stay_simulated_with_a_reason(calibrated):
    sim, _ = _quantized(calibrated, "llamagen-tiny", preset="rtn", bits=(8, None))
    report = to_real(copy.deepcopy(sim))
    assert {e["path"] for e in report.values()} == {"simulated"}
    assert all("weight-only" in e["reason"] for e in report.values())
    sim, _ = _quantized(calibrated, "par-tiny")
    sim.layers[0].attention.wo.input_quantizer.set_passthrough([0])
    report = to_real(copy.deepcopy(sim))
    assert report["layers.0.attention.wo"]["path"] == "simulated"
    assert "sink" in report["layers.0.attention.wo"]["reason"]
    assert report["layers.0.attention.matmul_qk"]["reason"].startswith("attention matmul")


def test_dynamic_token_acts_run_exactly(calibrated):
    sim, calib = _quantized(calibrated, "llamagen-tiny", preset="dtwq")
    real = copy.deepcopy(sim)
    report = to_real(real)
    assert "int8-cpu" in {e["path"] for e in report.values()}
    assert max(layer_errors(sim, real, report, calib).values()) <= EXACT


def test_objective_none_records_what_it_always_did(calibrated):
    sim, _ = _quantized(calibrated, "llamagen-tiny")
    report = to_real(copy.deepcopy(sim))
    assert not any({"objective", "timings_ms", "rows"} & set(e) for e in report.values())


def test_memory_objective_on_the_cpu_keeps_int8_where_eligible_and_simulated_elsewhere(calibrated):
    sim, _ = _quantized(calibrated, "par-tiny")
    sim.layers[0].attention.wo.input_quantizer.set_passthrough([0])
    default = to_real(copy.deepcopy(sim))
    report = to_real(copy.deepcopy(sim), objective="memory")
    assert {n: e["path"] for n, e in report.items()} == {n: e["path"] for n, e in default.items()}
    assert report["layers.0.attention.wo"]["path"] == "simulated"
    assert "sink" in report["layers.0.attention.wo"]["reason"]
    linears = [e for n, e in report.items() if "matmul" not in n]
    assert "int8-cpu" in {e["path"] for e in linears}
    assert all(e["objective"] == "memory" and "timings_ms" not in e for e in linears)
    weight_only, _ = _quantized(calibrated, "llamagen-tiny", preset="rtn", bits=(8, None))
    report = to_real(weight_only, objective="memory")
    assert {e["path"] for e in report.values()} == {"simulated"}


def test_memory_objective_ranks_paths_by_weight_bits_and_ties_go_to_the_default():
    assert _smallest("w4-gpu") == "w4-gpu"  # not its w8-gpu alternative
    assert _smallest("auto") == "int8-gpu"  # int8 and fp8 tie at 8 bits: the exact codes
    assert _smallest("fp8-gpu") == "fp8-gpu" and _smallest("int8-cpu") == "int8-cpu"


def test_compiled_w8a8_makes_no_elementwise_pass_more_than_the_float_model(calibrated):
    """Static activation scales: under torch.compile the norm writes the int8 codes (and their row sums)
    and each GEMM's epilogue fuses with the elementwise work after it, so the W8A8 FFN runs as many
    generated kernels as the float one, around its integer GEMMs."""
    fp, _ = calibrated["llamagen-tiny"]
    real, _ = _quantized(calibrated, "llamagen-tiny")
    to_real(real)
    (float_kernels, float_gemms), (int8_kernels, int8_gemms) = (
        compiled_ffn_launches(m, 4) for m in (fp, real)
    )
    assert len(int8_kernels) == len(float_kernels) == 3, (float_kernels, int8_kernels)
    assert len(int8_gemms) == len(float_gemms) == 3, (float_gemms, int8_gemms)
    norm = [k for k in int8_kernels if "rsqrt" in k]
    assert len(norm) == 1 and all(op in norm[0] for op in ("round", "clamp", "sum")), norm


def test_speed_objective_keeps_the_fastest_candidate_and_never_one_slower_than_dequantized(calibrated):
    """The choice from recorded timings (a pre-filled timing cache: no timing on the CPU)."""
    sim, _ = _quantized(calibrated, "llamagen-tiny")
    layer = sim.layers[0].attention.wo
    shape = (layer.in_features, layer.out_features, 64)
    times = {"dequantized": 0.010, "int8-gpu": 0.012, "fp8-gpu": 0.008}
    cache = {(path, *shape): ms for path, ms in times.items()}
    path, reason, record = _fastest(layer, "auto", "", 64, torch.bfloat16, torch.device("cpu"), cache)
    assert (path, reason, record) == ("fp8-gpu", "", {"timings_ms": times, "rows": 64})
    cache[("fp8-gpu", *shape)] = 0.010  # a tie with the baseline keeps the baseline
    path, reason, record = _fastest(layer, "auto", "", 64, torch.bfloat16, torch.device("cpu"), cache)
    assert path == "dequantized" and set(record["timings_ms"]) == set(times)
    assert reason == "no low-bit kernel faster than the dequantized bf16 GEMM at 64 rows"
    path, _, record = _fastest(layer, "int8-gpu", "", 64, torch.bfloat16, torch.device("cpu"), cache)
    assert path == "dequantized" and set(record["timings_ms"]) == {"dequantized", "int8-gpu"}


def test_a_dequantized_layer_is_the_simulated_layer_with_only_its_dequantized_weight(calibrated):
    sim, calib = _quantized(calibrated, "llamagen-tiny")
    layer = sim.layers[0].feed_forward.w2
    real = RealQuantLinear.from_quant_linear(layer, "dequantized")
    x = torch.randn(2, 5, layer.in_features)
    pos = torch.arange(1, 6)
    assert torch.equal(real(x, pos), layer(x, pos))  # the same fake-quantized input and weight
    assert not any(t is layer.weight for t in real.buffers())  # the float weight is not kept
    weight_bytes = layer.weight.numel() * layer.weight.element_size()
    assert weight_bytes <= real.describe_execution()["resident_bytes"] < 1.1 * weight_bytes


def test_objective_errors_name_the_choices_and_speed_needs_cuda(calibrated):
    sim, _ = _quantized(calibrated, "llamagen-tiny")
    with pytest.raises(ConfigError, match="objective must be one of") as error:
        to_real(copy.deepcopy(sim), objective="latency")
    assert all(repr(choice) in str(error.value) for choice in OBJECTIVES)
    with pytest.raises(ConfigError, match="CUDA device"):
        to_real(sim, objective="speed")
    assert not any(isinstance(m, RealQuantLinear) for m in sim.modules())  # refused before converting


@pytest.mark.parametrize("bits", [4, 6])
def test_pack_round_trip(bits):
    codes = torch.randint(0, 2**bits, (5, 24), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (5, 24 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, 24), codes)


def test_errors_are_typed(calibrated):
    sim, _ = _quantized(calibrated, "llamagen-tiny")
    with pytest.raises(ConfigError):
        to_real(sim, w8a8="int4")
    with pytest.raises(ConfigError):
        RealQuantLinear.from_quant_linear(sim.layers[0].attention.wo, "int2-cpu")


def test_artifact_loads_real_by_default_and_simulated_on_request(tmp_path, capsys):
    spec = {
        "model": "llamagen-tiny",
        "w_bits": 8,
        "a_bits": 8,
        "calibration": {"num_samples": 4, "batch_size": 4},
        "evaluation": {"num_images": 0},
    }
    manifest = quantize_job(spec, tmp_path / "a")
    assert manifest["execution"]["layers"]["layers.0.attention.wqkv"]["path"] == "int8-cpu"
    real, sim = load_generator(str(tmp_path / "a")), load_generator(str(tmp_path / "a"), real=False)
    assert real.execution["layers.0.attention.wqkv"]["path"] == "int8-cpu"
    assert {e["path"] for e in sim.execution.values()} == {"simulated"}
    tokens = real.generate_tokens([1, 2, 3], [5, 6, 7])
    assert float((tokens == sim.generate_tokens([1, 2, 3], [5, 6, 7])).float().mean()) >= 0.99
    args = ["generate", str(tmp_path / "a"), "--classes", "1,2", "--out", str(tmp_path / "g.png")]
    assert cli_main([*args, "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["execution"]["layers.0.feed_forward.w2"]["path"] == "int8-cpu"
    assert cli_main([*args, "--json", "--no-progress", "--simulate"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["execution"]["layers.0.feed_forward.w2"]["path"] == "simulated"
    assert cli_main([*args, "--json", "--no-progress", "--objective", "memory"]) == 0
    entry = json.loads(capsys.readouterr().out)["execution"]["layers.0.feed_forward.w2"]
    assert entry["path"] == "int8-cpu" and entry["objective"] == "memory"


def test_a_jobs_planned_execution_is_recorded_and_replayed_by_the_loader(tmp_path):
    spec = {
        "model": "llamagen-tiny",
        "calibration": {"num_samples": 4, "batch_size": 4},
        "evaluation": {"num_images": 0},
        "execution": {"objective": "memory"},
    }
    manifest = quantize_job(spec, tmp_path / "a")
    record = manifest["execution"]
    assert record["objective"] == "memory" and record["name"] == "cpu"
    assert record["layers"]["layers.0.attention.wqkv"]["objective"] == "memory"
    # what the planned kernels change: teacher-forced on the 4 calibration sequences
    against = record["vs_simulated"]
    assert against["sequences"] == 4 and 0 <= against["logit_kl"] < 1e-4 and against["top1_agreement"] >= 0.9
    generator = load_generator(str(tmp_path / "a"))
    entry = generator.execution["layers.0.attention.wqkv"]
    assert entry["planned"] == "recorded" and entry["path"] == "int8-cpu" and entry["objective"] == "memory"
    assert generator.generate_tokens([1, 2], [3, 4]).shape[0] == 2
    # an explicit objective plans again; a recorded path this device cannot run is refused by name
    assert (
        "planned"
        not in load_generator(str(tmp_path / "a"), objective="memory").execution["layers.0.attention.wqkv"]
    )
    model, _, _ = load_artifact(tmp_path / "a")
    bad = {"layers.0.attention.wqkv": {"path": "fp8-gpu"}}
    with pytest.raises(ConfigError, match="recorded plan runs layers.0.attention.wqkv on 'fp8-gpu'"):
        to_real(model, recorded=bad)
    # 'speed' needs the worker's GPU: refused before any work, naming the field
    with pytest.raises(ConfigError, match="execution.objective 'speed'") as error:
        quantize_job({**spec, "execution": {"objective": "speed"}}, tmp_path / "b", device="cpu")
    assert error.value.field == ("execution", "objective") and not (tmp_path / "b").exists()
    with pytest.raises(ConfigError, match="execution.tune_rows"):
        quantize_job({**spec, "execution": {"objective": "speed", "tune_rows": 0}}, tmp_path / "c")


@pytest.mark.parametrize(("bits", "packing"), [((8, 8), 8), ((6, 6), 6), ((4, 8), 4), ((4, None), 4)])
def test_artifacts_store_packed_codes_that_reload_to_the_same_quantized_model(calibrated, bits, packing):
    from quantcore.artifact import _packed_model_state, _unpack_weights

    model, _ = _quantized(calibrated, "llamagen-tiny", "ptq4arvg" if bits[1] else "rtn", bits)
    state, storage = _packed_model_state(model)
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    stored_bytes = sum(t.numel() * t.element_size() for t in state.values())
    assert storage and {m["packing"] for m in storage.values()} == {packing}
    for name, meta in storage.items():
        n, k = meta["shape"]
        codes = state[f"{name}.weight_codes"]
        assert f"{name}.weight" not in state and codes.dtype == torch.uint8
        assert codes.numel() == n * k * packing // 8
    assert stored_bytes < float_bytes * (packing / 32 + 0.25)  # norms, embeddings, tables stay float
    _unpack_weights(state, storage)
    reloaded = copy.deepcopy(model)
    reloaded.load_state_dict(state, strict=True)
    classes, tokens = (
        torch.tensor([1, 2]),
        torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(3)),
    )
    for name in storage:
        original, again = model.get_submodule(name), reloaded.get_submodule(name)
        assert torch.equal(original.quantized_weight(), again.quantized_weight())
    with torch.no_grad():
        assert torch.equal(model.sequence_logits(classes, tokens), reloaded.sequence_logits(classes, tokens))


@pytest.mark.skipif(not shutil.which("g++"), reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_sampling_of_a_quantized_real_model_matches_eager(calibrated):
    """torch.compile traces the quantizers and int8 modules without host syncs (CUDA graphs need the same)."""
    from torch._dynamo.utils import counters

    from quantcore.fastgen import FastSampler

    model, _ = _quantized(calibrated, "llamagen-tiny")
    to_real(model)
    sampling = {"cfg_scale": 2.0}
    classes, seeds = torch.tensor([1, 4]), [7, 8]
    eager = FastSampler(model, 2, sampling).generate(classes, seeds)
    torch._dynamo.reset()
    counters.clear()
    compiled = FastSampler(model, 2, sampling, compile=True).generate(classes, seeds)
    assert counters["stats"]["unique_graphs"] >= 2  # the blocks and the head really were compiled
    assert (eager == compiled).float().mean() >= 0.9  # fused kernels round differently: rare flips


@pytest.mark.parametrize("name", ["tiny-llamagen", "tiny-rar", "tiny-var"])
def test_an_8bit_kv_cache_samples_exactly_what_the_simulated_cache_did(name):
    from quantcore.fastgen import FastSampler
    from quantcore.quant.real import kv_codec_for
    from quantcore.registry import get_spec, load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(name)
    spec = get_spec(name)
    sampling = spec.entry.sampling.to_dict()
    calib = build_calibration_set(model, CalibrationSpec(num_samples=4, batch_size=4), sampling)
    quantize(model, Recipe.preset("ptq4arvg", 8, 8), calib)
    classes, seeds = torch.tensor([1, 2]), [5, 6]
    generate = generate_tokens
    plain = generate(model, classes, seeds, **sampling)
    # the same simulated model with only the cache storage changed: identical samples
    coded = copy.deepcopy(model)
    attentions = [m for m in coded.modules() if hasattr(m, "kv_codec")]
    for attention in attentions:
        attention.kv_codec, reason = kv_codec_for(attention)
        assert attention.kv_codec is not None, reason
    assert torch.equal(generate(coded, classes, seeds, **sampling), plain)
    # to_real attaches it too, and the caches then hold uint8 codes (a quarter of the fp32 bytes)
    report = to_real(model)
    entry = next(e for n, e in report.items() if n.endswith("matmul_qk"))
    assert entry["kv_cache"] == "8-bit codes"
    # the fused attention kernel is CUDA's: on the CPU decoding stays on the matmuls, and says why
    assert entry["decode"] == "matmuls (the fused attention kernel needs CUDA and Triton)"
    assert all(m.fused_attention is None for m in model.modules() if hasattr(m, "fused_attention"))
    sampler = FastSampler(model, 2, sampling)
    caches = [t for _, k, v in sampler.plan.caches for t in (k, v)]
    assert len(caches) == 2 * len(attentions) and all(t.dtype == torch.uint8 for t in caches)
    assert sampler.generate(classes, seeds).shape == plain.shape


@pytest.mark.skipif(not shutil.which("g++"), reason="torch.compile on the CPU needs a C++ compiler")
def test_fused_prologue_and_epilogue_equal_their_eager_form_at_every_row_count():
    """The GPU runs the torch.compile twins of the elementwise passes (dynamic rows, one compile); run
    here on the CPU, they must give the eager codes and outputs for any number of rows."""
    from quantcore.quant.quantizer import fake_quant_input
    from quantcore.quant.real import fp8_codes, int8_codes, int8_epilogue, kv_decode, kv_encode

    ops = (fake_quant_input, fp8_codes, int8_codes, int8_epilogue, kv_decode, kv_encode)
    assert all(op.compiled is not op.eager for op in ops)  # else this torch fell back and nothing is tested
    g = torch.Generator().manual_seed(0)
    k, n = 48, 40
    w_colterm = torch.randint(-500, 500, (n,), generator=g, dtype=torch.int32)
    w_zp = torch.randint(-3, 3, (n,), generator=g, dtype=torch.int32)
    w_scale, bias = torch.rand(n, generator=g) * 0.01, torch.randn(n, generator=g)
    for rows in (2, 7, 33, 130):
        x = torch.randn(rows, k, generator=g).to(torch.bfloat16) * 3
        scale, zp = (
            torch.rand(rows, generator=g) * 0.05 + 0.01,
            torch.randint(60, 200, (rows,), generator=g).float(),
        )
        a, rowsum = int8_codes.compiled(x, scale, zp, 8, 128)
        a_ref, rowsum_ref = int8_codes.eager(x, scale, zp, 8, 128)
        assert torch.equal(a, a_ref) and torch.equal(rowsum, rowsum_ref)
        acc = torch.randint(-20000, 20000, (rows, n), generator=g, dtype=torch.int32)
        args = (
            acc,
            (zp - 128).to(torch.int32),
            rowsum,
            w_colterm,
            w_zp,
            scale,
            w_scale,
            bias,
            torch.bfloat16,
        )
        assert torch.equal(int8_epilogue.compiled(*args), int8_epilogue.eager(*args))
        q, s8 = fp8_codes.compiled(x, scale, zp, 255)
        q_ref, s8_ref = fp8_codes.eager(x, scale, zp, 255)
        assert (
            q.dtype == torch.float8_e4m3fn
            and torch.equal(q.float(), q_ref.float())
            and torch.equal(s8, s8_ref)
        )
        for s, z in ((scale[:, None], zp[:, None]), (scale[0], zp[0])):  # per token, per tensor
            simulated = fake_quant_input.compiled(x, s, z, 8)
            assert simulated.dtype == x.dtype and torch.equal(simulated, fake_quant_input.eager(x, s, z, 8))
            codes = kv_encode.compiled(x, s, z, 8)
            assert torch.equal(codes, kv_encode.eager(x, s, z, 8))
            assert torch.equal(
                kv_decode.compiled(codes, s, z, x.dtype), kv_decode.eager(codes, s, z, x.dtype)
            )


def test_var_cached_decoding_sees_every_cached_key():
    """The fused kernel ignores VAR's attention bias in cached decoding: each scale's slice of it must
    be all zero (queries see every earlier scale and their own), as the official bias makes it."""
    from quantcore.fastgen import FastSampler
    from quantcore.registry import get_spec, load_model_and_tokenizer

    model, _ = load_model_and_tokenizer("tiny-var")
    plan = FastSampler(model, 1, get_spec("tiny-var").entry.sampling.to_dict()).plan
    assert len(plan.scales) == len(model.config.scale_bounds) > 1
    assert all(bool((bias == 0).all()) for _, _, _, bias in plan.scales)
    full = model.attn_bias_for_masking[0, 0]
    assert bool(torch.isinf(full).any())  # the table itself does mask: the slices are what matter
