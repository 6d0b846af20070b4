"""RAR and its MaskGIT VQGAN: official sizes and keys, strict loading, the KV-cached sampler, the sequence
layout, folding into the AdaLN rows, the STWQ tables and every preset end to end."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from reference_sampling import reference_tokens

from quantcore.api import load_generator, quantize_job
from quantcore.artifact import load_artifact
from quantcore.calib import CalibrationSpec, build_calibration_set
from quantcore.errors import CheckpointError, ConfigError
from quantcore.fastgen import generate_tokens
from quantcore.models.rar import MODELS, RAR, cfg_schedule, quant_layout
from quantcore.pipeline import quantize
from quantcore.quant.modules import QuantLinear, set_quant_mode
from quantcore.recipe import PRESETS, Recipe
from quantcore.registry import get_spec, load_model
from quantcore.tokenizers import build_tokenizer
from quantcore.tokenizers.maskgit_vqgan import MASKGIT_CONFIGS, MaskGITVQGAN, load_maskgit

TINY = MODELS["rar-tiny"]
SAMPLING = TINY.sampling.to_dict()


def random_rar(seed: int = 0, dtype=torch.float32, std: float = 0.3) -> RAR:
    """The tiny model with weights large enough that sampling is not uniform noise."""
    torch.manual_seed(seed)
    model = RAR(TINY.config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# ---------------------------------------------------------------------------------------------------
# Sizes and keys
# ---------------------------------------------------------------------------------------------------


def official_rar_params(dim: int, depth: int, mlp: int, heads: int = 16) -> int:
    """Parameters of the official RAR (modeling/rar.py), counted layer by layer from its description."""
    head_dim = dim // heads
    block = (
        2 * dim  # norm1
        + 3 * dim * dim + 3 * dim  # attn.qkv
        + 2 * 2 * head_dim  # attn.q_norm, attn.k_norm
        + dim * dim + dim  # attn.proj
        + 2 * dim  # norm2
        + dim * mlp + mlp + mlp * dim + dim  # mlp.fc1, mlp.fc2
        + 6 * dim * dim + 6 * dim  # adaLN_modulation.1
    )  # fmt: skip
    tables = (1 + (1024 + 1 + 1000 + 1) + 2 * (256 + 1024) + (256 + 100)) * dim
    head = 2 * dim * dim + 2 * dim + dim * 1024 + 1024
    return depth * block + tables + head


# (hidden, layers, MLP) from the official scripts, and the sizes the RAR paper quotes
OFFICIAL = {
    "rar-b": ((768, 24, 3072), 261e6),
    "rar-l": ((1024, 24, 4096), 461e6),
    "rar-xl": ((1280, 32, 5120), 955e6),
    "rar-xxl": ((1408, 40, 6144), 1.5e9),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_full_size_parameter_counts(name):
    (dim, depth, mlp), quoted = OFFICIAL[name]
    with torch.device("meta"):
        model = RAR(MODELS[name].config)
    count = sum(p.numel() for p in model.parameters())
    assert count == official_rar_params(dim, depth, mlp)
    assert abs(count - quoted) / quoted < 0.01, count
    assert get_spec(name).describe()["image_size"] == 256


def test_official_key_names_and_shapes():
    with torch.device("meta"):
        sd = RAR(MODELS["rar-xl"].config).state_dict()
    expected = {
        "cls_token",
        "embeddings.weight",
        "pos_embed",
        "target_aware_pos_embed",
        "timesteps_embeddings",
    }
    for i in range(32):
        for part in (
            "norm1",
            "attn.qkv",
            "attn.q_norm",
            "attn.k_norm",
            "attn.proj",
            "norm2",
            "mlp.fc1",
            "mlp.fc2",
        ):
            expected |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
        expected |= {f"blocks.{i}.adaLN_modulation.1.weight", f"blocks.{i}.adaLN_modulation.1.bias"}
    expected |= {f"adaln_before_head.adaLN_modulation.1.{p}" for p in ("weight", "bias")}
    expected |= {"lm_head.weight", "lm_head.bias"}
    assert set(sd) == expected  # attn_mask, caches and the None `one` buffers stay out
    assert tuple(sd["embeddings.weight"].shape) == (2026, 1280)
    assert tuple(sd["pos_embed"].shape) == tuple(sd["target_aware_pos_embed"].shape) == (1, 1280, 1280)
    assert tuple(sd["timesteps_embeddings"].shape) == (1, 356, 1280)
    assert tuple(sd["blocks.0.attn.q_norm.weight"].shape) == (80,)
    assert tuple(sd["adaln_before_head.adaLN_modulation.1.weight"].shape) == (2560, 1280)


def test_sampling_defaults_match_the_official_scripts():
    got = {
        n: (MODELS[n].sampling.cfg_scale, MODELS[n].sampling.cfg_pow, MODELS[n].sampling.temperature)
        for n in OFFICIAL
    }
    assert got == {
        "rar-b": (16.0, 2.75, 1.0),
        "rar-l": (15.5, 2.5, 1.02),
        "rar-xl": (6.9, 1.5, 1.02),
        "rar-xxl": (8.0, 1.2, 1.02),
    }
    assert all(MODELS[n].sampling.top_k == 0 and MODELS[n].sampling.top_p == 1.0 for n in OFFICIAL)


def official_maskgit_params(hidden=128, mult=(1, 1, 2, 2, 4), n_res=2, z=256, codebook=1024) -> int:
    """Parameters of the official MaskGIT VQGAN (modeling/modules/maskgit_vqgan.py), from its description."""

    def conv(k, i, o, bias=True):
        return k * k * i * o + (o if bias else 0)

    def res(i, o):  # convs without bias; the shortcut conv maps out -> out
        return (
            2 * i
            + conv(3, i, o, False)
            + 2 * o
            + conv(3, o, o, False)
            + (conv(1, o, o, False) if i != o else 0)
        )

    widths = [hidden * m for m in mult]
    top = widths[-1]
    enc, c_in = conv(3, 3, hidden, False), hidden
    for w in widths:
        enc += res(c_in, w) + (n_res - 1) * res(w, w)  # avg-pool downsampling has no parameters
        c_in = w
    enc += n_res * res(top, top) + 2 * top + conv(1, top, z)
    dec = conv(3, z, top) + n_res * res(top, top)
    for i, w in enumerate(widths):
        dec += res(widths[min(i + 1, len(widths) - 1)], w) + (n_res - 1) * res(w, w)
        dec += conv(3, w, w) if i else 0
    dec += 2 * widths[0] + conv(3, widths[0], 3)
    return enc + dec + codebook * z


def test_maskgit_size_and_key_layout():
    with torch.device("meta"):
        model = MaskGITVQGAN(MASKGIT_CONFIGS["MaskGIT-VQGAN"])
    count = sum(p.numel() for p in model.parameters())
    assert count == official_maskgit_params()
    assert 50e6 < count < 60e6, count  # 54.5M: 218 MB of fp32 weights
    keys = set(model.state_dict())
    for key in [
        "encoder.conv_in.weight",
        "encoder.down.0.block.1.conv2.weight",
        "encoder.down.2.block.0.nin_shortcut.weight",
        "encoder.mid.1.norm2.bias",
        "encoder.conv_out.bias",
        "decoder.conv_in.bias",
        "decoder.up.4.block.0.conv1.weight",
        "decoder.up.1.block.0.nin_shortcut.weight",
        "decoder.up.1.upsample_conv.bias",
        "decoder.conv_out.weight",
        "quantize.embedding.weight",
    ]:
        assert key in keys, key
    assert "encoder.conv_in.bias" not in keys and "decoder.up.0.upsample_conv.weight" not in keys
    assert model.downsample_factor == 16 and tuple(model.quantize.embedding.weight.shape) == (1024, 256)


def test_maskgit_encode_decode_round_trip_shapes():
    torch.manual_seed(0)
    vq = build_tokenizer("MaskGIT-tiny")
    images = torch.randint(0, 256, (2, 8, 12, 3), dtype=torch.uint8)
    tokens = vq.encode_to_tokens(images)
    assert tokens.shape == (2, 4 * 6) and int(tokens.max()) < 64
    assert torch.equal(vq.encode_to_tokens(images.permute(0, 3, 1, 2) / 255.0), tokens)
    decoded = vq.decode_tokens(tokens, grid=(4, 6))
    assert decoded.shape == (2, 8, 12, 3) and decoded.dtype == torch.uint8
    with pytest.raises(ConfigError, match="token ids"):
        vq.decode_tokens(torch.full((1, 4), 64))
    with pytest.raises(ConfigError, match="multiple of the downsample factor"):
        vq.encode_to_tokens(torch.zeros(1, 3, 5, 6))


# ---------------------------------------------------------------------------------------------------
# Strict checkpoint loading
# ---------------------------------------------------------------------------------------------------


def test_official_layout_checkpoint_loads_and_gives_the_same_logits(tmp_path):
    model = random_rar(seed=3)
    path = tmp_path / "rar_tiny.bin"
    torch.save(model.state_dict(), path)  # rar_*.bin are plain state dicts
    loaded = load_model("rar-tiny", path)
    classes, tokens = torch.tensor([1, 2]), torch.randint(0, 64, (2, 16))
    assert torch.equal(loaded.sequence_logits(classes, tokens), model.sequence_logits(classes, tokens))


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda sd: sd.pop("blocks.1.attn.k_norm.bias"), "blocks.1.attn.k_norm.bias"),
        (lambda sd: sd.update({"blocks.0.one_msa": torch.ones(64)}), "blocks.0.one_msa"),
        (lambda sd: sd.update({"timesteps_embeddings": torch.zeros(1, 5, 64)}), "timesteps_embeddings"),
    ],
    ids=["missing", "extra", "wrong-shape"],
)
def test_bad_checkpoints_are_refused_naming_the_key(tmp_path, edit, key):
    sd = random_rar().state_dict()
    edit(sd)
    torch.save(sd, tmp_path / "bad.bin")
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_model("rar-tiny", tmp_path / "bad.bin")


def test_maskgit_checkpoint_loads_strictly_and_names_bad_keys(tmp_path):
    torch.manual_seed(1)
    vq = build_tokenizer("MaskGIT-tiny")
    sd = vq.state_dict()
    torch.save(sd, tmp_path / "vq.bin")
    loaded = load_maskgit(tmp_path / "vq.bin", "MaskGIT-tiny")
    tokens = torch.randint(0, 64, (1, 16))
    assert torch.equal(loaded.decode_tokens(tokens), vq.decode_tokens(tokens))
    with pytest.raises(CheckpointError, match="pass config_name='MaskGIT-tiny'"):
        load_maskgit(tmp_path / "vq.bin")  # the full-size config asked for
    sd.pop("decoder.conv_in.bias")
    torch.save(sd, tmp_path / "bad.bin")
    with pytest.raises(CheckpointError, match=r"decoder\.conv_in\.bias"):
        load_maskgit(tmp_path / "bad.bin", "MaskGIT-tiny")


# ---------------------------------------------------------------------------------------------------
# Sequence layout and sampling
# ---------------------------------------------------------------------------------------------------


def test_inputs_follow_the_official_layout():
    model = random_rar(dtype=torch.float64)
    cfg = model.config
    classes, tokens = torch.tensor([3, model.null_class]), torch.tensor([[5, 6, 7], [8, 9, 10]])
    pos = torch.arange(5)
    x, c = model.embed(classes, tokens, pos)
    class_ids = classes + cfg.codebook_size + 1
    assert int(class_ids[1]) == cfg.vocab_size - 1  # the null id (2025 at full size)
    emb, pe, ta = model.embeddings.weight, model.pos_embed[0], model.target_aware_pos_embed[0]
    torch.testing.assert_close(x[:, 0], (model.cls_token[0, 0] + pe[0]).expand(2, -1))
    torch.testing.assert_close(x[:, 1], emb[class_ids] + pe[1] + ta[2])  # predicts image position 0
    torch.testing.assert_close(x[:, 4], emb[tokens[:, 2]] + pe[4] + ta[5])  # t2 predicts image position 3
    torch.testing.assert_close(c, emb[class_ids][:, None] + model.timesteps_embeddings[0, :5])


def test_cfg_schedule_is_the_official_cosine_ramp():
    assert cfg_schedule(0, 256, 16.0, 2.75) == 1.0
    half = (16.0 - 1) * (1 - math.cos(math.pi * 0.5**2.75)) / 2 + 1
    assert cfg_schedule(128, 256, 16.0, 2.75) == pytest.approx(half)
    assert cfg_schedule(255, 256, 6.9, 1.5) < 6.9


@pytest.mark.parametrize(
    "kwargs",
    [SAMPLING, {"cfg_scale": 0.0, "cfg_pow": 1.0, "temperature": 0.7, "top_k": 8, "top_p": 0.9}],
    ids=["cfg", "no-cfg-top-k-p"],
)
def test_kv_cache_sampling_matches_full_recomputation(kwargs):
    model = random_rar(dtype=torch.float64)
    classes = torch.tensor([1, 5, 9])
    cached = generate_tokens(model, classes, [3, 4, 5], **kwargs)
    full = reference_tokens(model, classes, [3, 4, 5], **kwargs)
    assert torch.equal(cached, full)
    assert len(set(cached.flatten().tolist())) > 4  # not a degenerate constant sequence


def test_cached_logits_equal_teacher_forced_logits():
    model = random_rar(dtype=torch.float64)
    classes = torch.tensor([2, 3])
    tokens = generate_tokens(model, classes, [0, 1], cfg_scale=0.0, cfg_pow=1.0)
    teacher = model.sequence_logits(classes, tokens)
    assert teacher.shape == (2, 16, 64)
    model.setup_caches(2)
    steps = [torch.arange(2)] + [torch.tensor([p]) for p in range(2, model.config.seq_len)]
    collected = []
    for pos in steps:
        x, c = model.embed(classes, tokens, pos)
        collected.append(model(x, c, pos, use_cache=True))
    model.clear_caches()
    torch.testing.assert_close(torch.cat(collected, dim=1), teacher, rtol=1e-9, atol=1e-9)


def test_seed_determines_image_independent_of_batch_and_progress_counts():
    model = random_rar()
    seen = []
    alone = generate_tokens(model, torch.tensor([4]), [11], progress=seen.append, **SAMPLING)
    batched = generate_tokens(model, torch.tensor([1, 4, 7]), [10, 11, 12], **SAMPLING)
    assert torch.equal(alone[0], batched[1]) and not torch.equal(batched[0], batched[1])
    assert seen == list(range(1, 17))
    with pytest.raises(ConfigError, match="one seed per image"):
        generate_tokens(model, torch.tensor([1, 2]), [0], **SAMPLING)


# ---------------------------------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------------------------------


def test_layout_sites_rows_and_tables():
    model = random_rar()
    layout = quant_layout(model)
    qkv, fc1 = layout.fold_sites[0], layout.fold_sites[1]
    assert (qkv.producer.scale, qkv.producer.shift, qkv.producer.n_chunks) == (1, 0, 6)
    assert (fc1.producer.scale, fc1.producer.shift, fc1.producer.one) == (4, 3, "blocks.0.one_mlp")
    head = layout.fold_sites[-1]
    assert head.linears == ("lm_head",) and head.head and not head.gps
    assert (head.producer.scale, head.producer.shift, head.producer.n_chunks) == (0, 1, 2)
    assert layout.sink_positions == (0, 1) and layout.seq_len == 17
    assert layout.position_groups.tolist() == [0, 1] + [2] * 15
    assert layout.groups_for("blocks.1.adaLN_modulation.1", False).tolist() == list(range(17))
    assert layout.groups_for("adaln_before_head.adaLN_modulation.1", False).tolist() == [0] + list(range(16))
    assert len(layout.all_linears) == 2 * 5 + 2  # qkv, fc1, proj, fc2, AdaLN per block; head, final AdaLN
    for name in layout.all_linears + layout.matmuls:
        model.get_submodule(name)


@pytest.fixture(scope="module")
def calibrated():
    fp = random_rar()
    calib = build_calibration_set(fp, CalibrationSpec(num_samples=8, batch_size=8), SAMPLING)
    return fp, calib


@pytest.mark.parametrize("preset", ["smoothquant", "os+", "gps", "ptq4arvg"])
def test_folding_into_adaln_rows_is_exact_with_quantization_off(calibrated, preset):
    fp, calib = calibrated
    model = copy.deepcopy(fp)
    quantize(model, Recipe.preset(preset, 6, 6), calib)
    set_quant_mode(model, weights="off", acts="off")
    ref = fp.sequence_logits(calib.classes, calib.tokens)
    assert rel_err(model.sequence_logits(calib.classes, calib.tokens), ref) <= 1e-5
    # the scales landed in the AdaLN rows and the `one` buffers
    assert model.blocks[0].one_msa is not None and model.blocks[1].one_mlp is not None
    ada, ada_fp = model.blocks[0].adaLN_modulation[1], fp.blocks[0].adaLN_modulation[1]
    assert not torch.equal(ada.weight[64:128], ada_fp.weight[64:128])  # scale_msa rows
    assert torch.equal(ada.weight[128:192], ada_fp.weight[128:192])  # gate_msa rows untouched
    head_folded = model.adaln_before_head.one is not None
    assert head_folded == (preset != "gps")  # RAR keeps GPS off its head


def test_stwq_tables_are_indexed_by_absolute_position_during_kv_decoding(calibrated):
    fp, calib = calibrated
    model = copy.deepcopy(fp).double()
    quantize(model, Recipe.preset("ptq4arvg", 8, 8), calib)
    final: QuantLinear = model.adaln_before_head.adaLN_modulation[1]
    block: QuantLinear = model.blocks[1].adaLN_modulation[1]
    qkv: QuantLinear = model.blocks[0].attn.qkv
    assert final.input_quantizer.num_params == 16 and block.input_quantizer.num_params == 17
    assert qkv.input_quantizer.num_params == 3 and model.lm_head.input_quantizer.granularity == "tensor"
    assert len(set(final.input_quantizer.scale.tolist())) == 16  # every position calibrated on its own
    seen = {"final": [], "block": []}
    for key, lin in (("final", final), ("block", block)):
        q, original = lin.input_quantizer, lin.input_quantizer.params_for

        def spy(x, pos, q=q, original=original, key=key):
            seen[key].append((pos.clone(), q.groups_of(pos).clone()))
            return original(x, pos)

        q.params_for = spy
    cached = generate_tokens(model, torch.tensor([1, 2]), [0, 1], **SAMPLING)
    del final.input_quantizer.params_for, block.input_quantizer.params_for  # the methods again
    final_pos = torch.cat([p for p, _ in seen["final"]])
    assert final_pos.tolist() == list(range(1, 17))  # the prefill runs the head on the class token only
    assert torch.equal(torch.cat([g for _, g in seen["final"]]), final_pos - 1)
    assert torch.equal(torch.cat([g for _, g in seen["block"]]), torch.arange(17))
    full = reference_tokens(model, torch.tensor([1, 2]), [0, 1], **SAMPLING)
    assert torch.equal(cached, full)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_runs_end_to_end_and_round_trips(tmp_path, preset):
    spec = {
        "model": "rar-tiny",
        "recipe": preset,
        "w_bits": 6,
        "a_bits": 6,
        "calibration": {"num_samples": 4, "batch_size": 4},
        "evaluation": {"num_images": 2},
    }
    manifest = quantize_job(spec, tmp_path / "art")
    assert manifest["model"]["family"] == "rar" and manifest["recipe"]["name"] == preset
    assert 0.0 <= manifest["metrics"]["token_agreement"] <= 1.0
    model, _, loaded = load_artifact(tmp_path / "art")
    assert loaded["layers"] == manifest["layers"]
    images = load_generator(str(tmp_path / "art")).generate([1, 2], [5, 6])
    assert images.shape == (2, 8, 8, 3) and images.dtype == torch.uint8
