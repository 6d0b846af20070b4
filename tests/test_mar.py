"""MAR and its KL-16 VAE: official sizes and keys, strict loading of official-layout files, the masked
generation schedule, the diffusion head's sampler, determinism, and the quantization layout."""

import copy
import math

import numpy as np
import pytest
import torch

from quantcore.api import load_generator, quantize_job
from quantcore.artifact import load_artifact
from quantcore.calib import CalibrationSpec, build_calibration_set
from quantcore.checkpoint import CheckpointError
from quantcore.errors import ConfigError
from quantcore.fastgen import generate_tokens
from quantcore.models import mar
from quantcore.models.mar import MODELS
from quantcore.nn import Linear
from quantcore.pipeline import layout_of, quantize
from quantcore.quant.modules import QuantLinear, iter_quant_modules, set_quant_mode
from quantcore.recipe import PRESETS, Recipe
from quantcore.registry import get_spec, load_model
from quantcore.tokenizers import build_tokenizer, load_tokenizer

TINY = MODELS["mar-tiny"]
SAMPLING = TINY.sampling.to_dict()


def random_mar(seed: int = 0, head_std: float = 0.05) -> mar.MAR:
    """The tiny model, officially initialised, its zero-initialised diffusion outputs made small but live."""
    torch.manual_seed(seed)
    model = mar.init_official(mar.build(TINY.config)).eval()
    with torch.no_grad():
        net = model.diffloss.net
        for linear in [b.adaLN_modulation[1] for b in net.res_blocks] + [net.final_layer.linear]:
            linear.weight.normal_(0.0, head_std)
    return model


# ---------------------------------------------------------------------------------------------------
# Sizes and keys
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, millions", [("mar-b", 208), ("mar-l", 479), ("mar-h", 943)])
def test_full_size_parameter_counts_match_the_official_readme(name, millions):
    count = get_spec(name).parameter_count()  # built on the meta device
    # the MAR README lists 208M / 479M / 943M: our counts 207.9M / 478.3M / 942.4M, rounded up
    assert math.ceil(count / 1e6) == millions


def test_official_key_names_and_shapes():
    model = get_spec("mar-b").build("meta")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "class_emb.weight": (1000, 768),
        "fake_latent": (1, 768),
        "z_proj.weight": (768, 16),
        "z_proj_ln.weight": (768,),
        "encoder_pos_embed_learned": (1, 320, 768),
        "encoder_blocks.11.attn.qkv.bias": (2304,),
        "encoder_blocks.0.mlp.fc1.weight": (3072, 768),
        "encoder_norm.bias": (768,),
        "decoder_embed.weight": (768, 768),
        "mask_token": (1, 1, 768),
        "decoder_pos_embed_learned": (1, 320, 768),
        "decoder_blocks.11.mlp.fc2.weight": (768, 3072),
        "decoder_norm.weight": (768,),
        "diffusion_pos_embed_learned": (1, 256, 768),
        "diffloss.net.time_embed.mlp.0.weight": (1024, 256),
        "diffloss.net.time_embed.mlp.2.weight": (1024, 1024),
        "diffloss.net.cond_embed.weight": (1024, 768),
        "diffloss.net.input_proj.weight": (1024, 16),
        "diffloss.net.res_blocks.5.in_ln.weight": (1024,),
        "diffloss.net.res_blocks.5.mlp.2.weight": (1024, 1024),
        "diffloss.net.res_blocks.5.adaLN_modulation.1.weight": (3072, 1024),
        "diffloss.net.final_layer.linear.weight": (32, 1024),
        "diffloss.net.final_layer.adaLN_modulation.1.weight": (2048, 1024),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    assert "diffloss.net.res_blocks.6.in_ln.weight" not in shapes  # 6 blocks for MAR-B
    assert "diffloss.net.final_layer.norm_final.weight" not in shapes  # LayerNorm without affine
    # every key is a parameter: no buffer beyond the official state dict
    assert set(shapes) == {n for n, _ in model.named_parameters()}


def test_sampling_defaults_match_the_official_scripts():
    assert {n: MODELS[n].sampling.cfg_scale for n in ("mar-b", "mar-l", "mar-h")} == {
        "mar-b": 2.9,
        "mar-l": 3.0,
        "mar-h": 3.2,
    }
    defaults = MODELS["mar-l"].sampling
    assert (defaults.cfg_schedule, defaults.temperature, defaults.num_iter, defaults.num_sampling_steps) == (
        "linear",
        1.0,
        64,
        "100",
    )
    assert MODELS["mar-b"].config.diffloss_depth == 6 and MODELS["mar-h"].config.diffloss_width == 1536


def _official_file(path, model_sd, ema_sd):
    torch.save({"model": model_sd, "model_ema": ema_sd, "epoch": 799}, path)


def test_official_layout_checkpoint_loads_strictly_with_the_ema_weights(tmp_path):
    trained, ema = random_mar(0), random_mar(1)
    _official_file(tmp_path / "checkpoint-last.pth", trained.state_dict(), ema.state_dict())
    loaded = load_model("mar-tiny", tmp_path / "checkpoint-last.pth")
    for key, value in ema.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    tokens = torch.randn(2, 16, 4)
    torch.testing.assert_close(
        loaded.sequence_logits(torch.tensor([1, 2]), tokens),
        ema.sequence_logits(torch.tensor([1, 2]), tokens),
    )


@pytest.mark.parametrize("edit", ["drop", "extra", "shape"])
def test_bad_checkpoints_are_refused_naming_the_key(tmp_path, edit):
    sd = random_mar().state_dict()
    key = "decoder_blocks.1.attn.qkv.weight"
    if edit == "drop":
        del sd[key]
    elif edit == "extra":
        key = "encoder_blocks.0.ls1.gamma"
        sd[key] = torch.zeros(32)
    else:
        sd[key] = torch.zeros(3, 3)
    _official_file(tmp_path / "bad.pth", sd, sd)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_model("mar-tiny", tmp_path / "bad.pth")


# ---------------------------------------------------------------------------------------------------
# The masked generation schedule and the diffusion head
# ---------------------------------------------------------------------------------------------------


def test_mask_schedule_is_the_official_cosine_and_predicts_every_token_once():
    # 64 rounds over 256 tokens leave 6 masked for the last round (where PTQ4ARVG captures its inputs)
    assert mar.masked_before_last_round(256, 64) == 6
    model = random_mar()
    plan = mar.DecodePlan(model, 2, SAMPLING, compile=False)
    # floor(16 cos(pi/2 k/4)) for k = 1..3 (14.8, 11.3, 6.1); the last round takes the rest
    assert plan.mask_lens == [14, 11, 6, 0]
    plan.reset(torch.tensor([1, 2]), [3, 4])
    predicted = torch.zeros(2, 16, dtype=torch.long)
    for _ in range(plan.steps):
        before = plan.mask.clone()
        plan.step()
        predicted += (before & ~plan.mask).long()
    assert predicted.eq(1).all() and not plan.mask.any()
    # the generation order is a random permutation per image: the first token predicted is order[0]
    assert not torch.equal(plan.orders[0], plan.orders[1])


def test_spaced_timesteps_and_cosine_schedule_follow_the_official_diffusion():
    kept = mar.spaced_timesteps(1000, "100")
    assert len(kept) == 100 and kept[:3] == [0, 10, 20] and kept[-2:] == [989, 999]
    assert mar.spaced_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    full = mar.diffusion_schedule("")
    abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert float(full.betas[0]) == pytest.approx(1 - abar(1 / 1000) / abar(0))
    assert float(full.betas.max()) <= 0.999
    spaced = mar.diffusion_schedule("100")
    # respacing keeps the cumulative products of the kept steps
    torch.testing.assert_close(spaced.alphas_cumprod, full.alphas_cumprod[kept])
    with pytest.raises(ConfigError, match="num_sampling_steps"):
        mar.diffusion_schedule("fast")


def test_cfg_of_one_on_the_diffusion_head_equals_the_conditional_sampler():
    model = random_mar()
    z = torch.randn(6, 32)
    noise = torch.randn(3, 5, 4)
    schedule = mar.diffusion_schedule("5")
    guided = mar.sample_diffusion(model.diffloss.net, z, noise, schedule, 1.0, cfg=1.0)
    plain = mar.sample_diffusion(model.diffloss.net, z[:3], noise, schedule, 1.0, cfg=None)
    torch.testing.assert_close(guided, plain)
    stronger = mar.sample_diffusion(model.diffloss.net, z, noise, schedule, 1.0, cfg=4.0)
    assert not torch.allclose(stronger, plain)
    cooler = mar.sample_diffusion(model.diffloss.net, z[:3], noise, schedule, 0.5, cfg=None)
    assert not torch.allclose(cooler, plain)  # temperature scales the per-step noise


def _same_latents(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal up to float32 rounding: a CPU GEMM may block (and so round) rows differently when the
    batch changes (seen on an Intel Xeon: 4e-3 on latents of magnitude 4e4); the noise, drawn per image
    from its seed, is what must not depend on the batch, and a wrong draw moves latents by their scale."""
    return float((x - y).abs().max()) <= 1e-5 * float(x.abs().max())


def test_same_seed_same_latents_whatever_the_batch():
    model = random_mar()
    a = generate_tokens(model, torch.tensor([1, 2, 3]), [5, 6, 7], **SAMPLING)
    b = generate_tokens(model, torch.tensor([3, 1]), [7, 5], **SAMPLING)
    assert a.shape == (3, 16, 4) and torch.isfinite(a).all()
    assert _same_latents(a[2], b[0]) and _same_latents(a[0], b[1])
    c = generate_tokens(model, torch.tensor([1]), [8], **SAMPLING)
    assert not _same_latents(a[0], c[0])
    constant = generate_tokens(model, torch.tensor([1]), [5], **{**SAMPLING, "cfg_schedule": "constant"})
    unguided = generate_tokens(model, torch.tensor([1]), [5], **{**SAMPLING, "cfg_scale": 1.0})
    assert not _same_latents(constant[0], a[0]) and not _same_latents(unguided[0], a[0])


@pytest.mark.parametrize(
    "override, field",
    [({"cfg_schedule": "cosine"}, "cfg_schedule"), ({"num_iter": 17}, "num_iter"), ({"num_sampling_steps": "x"}, "num_sampling_steps")],
)  # fmt: skip
def test_bad_sampling_settings_are_refused_naming_them(override, field):
    with pytest.raises(ConfigError, match=field):
        generate_tokens(random_mar(), torch.tensor([1]), [0], **{**SAMPLING, **override})


def test_teacher_forced_conditions_and_diffusion_loss():
    model = random_mar()
    tokens = torch.randn(3, 16, 4)
    classes = torch.tensor([1, 2, model.null_class])
    mask = model.calibration_mask(3, "cpu")
    assert int(mask[0].sum()) == mar.masked_before_last_round(16, 4) and torch.equal(mask[0], mask[2])
    z = model.sequence_logits(classes, tokens)
    assert z.shape == (3, 16, 32)
    # known tokens feed the encoder; masked ones never do
    edited = tokens.clone()
    edited[mask] += 1.0
    torch.testing.assert_close(model.sequence_logits(classes, edited), z)
    edited[~mask] += 1.0
    assert not torch.allclose(model.sequence_logits(classes, edited), z)
    # the uncond row reads fake_latent, not a class embedding
    uncond = model.sequence_logits(torch.tensor([model.null_class]), tokens[:1])
    assert not torch.allclose(uncond, z[:1])
    with pytest.raises(ConfigError, match="latents"):
        model.sequence_logits(classes, torch.zeros(3, 16, dtype=torch.long))
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    train_mask = model.training_mask(3, gen())
    assert 0.7 * 16 <= int(train_mask[0].sum()) <= 16 and train_mask.sum(1).unique().numel() == 1
    loss = mar.diffusion_loss(model, classes, tokens, train_mask, gen())
    assert loss.shape == (3,) and torch.isfinite(loss).all()
    torch.testing.assert_close(loss, mar.diffusion_loss(model, classes, tokens, train_mask, gen()))


# ---------------------------------------------------------------------------------------------------
# The KL-16 VAE
# ---------------------------------------------------------------------------------------------------


def test_kl16_key_layout():
    vae = build_tokenizer("KL-16", "meta")
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert shapes["encoder.conv_out.weight"] == (32, 512, 3, 3)  # mean and log-variance
    assert shapes["quant_conv.weight"] == (32, 32, 1, 1) and shapes["post_quant_conv.weight"] == (
        16,
        16,
        1,
        1,
    )
    assert shapes["encoder.down.4.attn.1.q.weight"] == (512, 512, 1, 1)  # attention at 16x16 only
    assert "encoder.down.3.attn.0.q.weight" not in shapes
    assert shapes["encoder.down.0.downsample.conv.weight"] == (128, 128, 3, 3)
    assert "encoder.down.4.downsample.conv.weight" not in shapes
    assert shapes["encoder.down.2.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert shapes["encoder.mid.attn_1.proj_out.weight"] == (512, 512, 1, 1)
    assert shapes["decoder.up.0.block.2.conv1.weight"] == (128, 128, 3, 3)  # num_res_blocks + 1
    assert shapes["decoder.up.4.upsample.conv.weight"] == (512, 512, 3, 3)
    assert not any(k.startswith("decoder.up.") and ".attn." in k for k in shapes)


def test_kl_checkpoint_loads_strictly_and_round_trips_shapes(tmp_path):
    torch.manual_seed(0)
    vae = build_tokenizer("KL-tiny")
    torch.save({"model": vae.state_dict()}, tmp_path / "kl16.ckpt")  # the official file's layout
    loaded = load_tokenizer("KL-tiny", tmp_path / "kl16.ckpt")
    images = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    mean, logvar = loaded.encode(images)
    assert mean.shape == logvar.shape == (2, 4, 4, 4)
    torch.testing.assert_close(loaded.encode_latents(images), vae.encode_latents(images))
    sampled = loaded.encode_latents(images, torch.Generator().manual_seed(0))
    assert not torch.equal(sampled, mean)
    decoded = loaded.decode_latents(mean)
    assert decoded.shape == (2, 8, 8, 3) and decoded.dtype == torch.uint8
    # MAR's images: tokens (B, 16, 4) in raster order -> latents / 0.2325
    tokens = (mean * mar.LATENT_SCALE).flatten(2).transpose(1, 2)
    assert torch.equal(mar.decode_images(random_mar(), loaded, tokens), decoded)
    sd = vae.state_dict()
    del sd["decoder.mid.attn_1.k.weight"]
    torch.save({"model": sd}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match=r"decoder\.mid\.attn_1\.k\.weight"):
        load_tokenizer("KL-tiny", tmp_path / "bad.ckpt")
    with pytest.raises(ConfigError, match="latents"):
        loaded.decode_latents(torch.zeros(1, 3, 4, 4))


# ---------------------------------------------------------------------------------------------------
# Quantization: the layout, exact folding, STWQ tables, every preset end to end
# ---------------------------------------------------------------------------------------------------


def test_layout_quantizes_the_transformer_blocks_only():
    model = random_mar()
    layout = layout_of(model)
    assert [s.producer for s in layout.fold_sites[:2]] == ["encoder_blocks.0.norm1", "encoder_blocks.0.norm2"]
    assert layout.fold_sites[-1].linears == ("decoder_blocks.1.mlp.fc1",)
    assert not any(s.head for s in layout.fold_sites) and all(s.gps for s in layout.fold_sites)
    assert len(layout.all_linears) == 4 * (2 + 2)  # qkv, fc1, proj, fc2 in every encoder and decoder block
    assert layout.matmuls == ()  # the official keeps timm's fused attention: not quantized
    assert layout.sink_positions == (0, 1, 2, 3) and layout.seq_len == 4 + 16
    assert layout.position_groups.tolist() == [0, 1, 2, 3] + [4] * 16
    assert layout.feature_module == "decoder_blocks.1"
    for name in layout.all_linears:
        model.get_submodule(name)


@pytest.fixture(scope="module")
def calibrated():
    fp = random_mar()
    calib = build_calibration_set(fp, CalibrationSpec(num_samples=4, batch_size=4), SAMPLING)
    return fp, calib


@pytest.mark.parametrize("preset", ["smoothquant", "os+", "gps", "ptq4arvg"])
def test_folding_into_the_layernorms_is_exact_with_quantization_off(calibrated, preset):
    fp, calib = calibrated
    assert calib.tokens.shape == (4, 16, 4) and calib.tokens.is_floating_point()
    model = copy.deepcopy(fp)
    quantize(model, Recipe.preset(preset, 6, 6), calib)
    set_quant_mode(model, weights="off", acts="off")
    ref = fp.sequence_logits(calib.classes, calib.tokens)
    got = model.sequence_logits(calib.classes, calib.tokens)
    assert float((got - ref).detach().norm() / ref.detach().norm()) <= 1e-5
    assert not torch.equal(model.decoder_blocks[0].norm1.weight, fp.decoder_blocks[0].norm1.weight)
    # kept in FP: the diffusion MLP, the token and decoder embeddings
    quantized = {name for name, _ in iter_quant_modules(model)}
    assert quantized == set(layout_of(model).all_linears)
    assert isinstance(model.z_proj, Linear) and not isinstance(model.z_proj, QuantLinear)


def test_stwq_gives_each_buffer_position_its_own_parameters(calibrated):
    fp, calib = calibrated
    model = copy.deepcopy(fp)
    quantize(model, Recipe.preset("ptq4arvg", 8, 8), calib)
    for name in ("encoder_blocks.0.attn.qkv", "decoder_blocks.1.mlp.fc2"):
        q = model.get_submodule(name).input_quantizer
        assert q.granularity == "group" and q.num_params == 4 + 1
        assert len(set(q.scale.tolist())) == q.num_params  # every group calibrated on its own
    # the quantized model still samples, deterministically
    a = generate_tokens(model, torch.tensor([1, 2]), [3, 4], **SAMPLING)
    assert torch.equal(a, generate_tokens(model, torch.tensor([1, 2]), [3, 4], **SAMPLING))
    assert not torch.equal(a, generate_tokens(fp, torch.tensor([1, 2]), [3, 4], **SAMPLING))


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mar") / "checkpoint-last.pth"
    _official_file(path, random_mar(1).state_dict(), random_mar(0).state_dict())
    return path


@pytest.mark.parametrize("bits", [8, 6])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_runs_end_to_end_and_round_trips(tmp_path, official_file, preset, bits):
    spec = {
        "model": "mar-tiny",
        "checkpoint": str(official_file),
        "recipe": preset,
        "w_bits": bits,
        "a_bits": bits,
        "calibration": {"num_samples": 4, "batch_size": 4},
        "evaluation": {"num_images": 2},
    }
    manifest = quantize_job(spec, tmp_path / "art")
    assert manifest["model"]["family"] == "mar" and manifest["recipe"]["name"] == preset
    metrics = manifest["metrics"]
    assert "token_agreement" not in metrics and "logit_kl" not in metrics  # no ids, no logits
    assert 0.0 < metrics["latent_rel_error"] and 0.0 < metrics["condition_rel_error"] < 1.0
    assert metrics["diffusion_loss"] > 0 and metrics["diffusion_loss_fp"] > 0
    model, _, loaded = load_artifact(tmp_path / "art")
    assert loaded["layers"] == manifest["layers"]
    images = load_generator(str(tmp_path / "art")).generate([1, 2, 3], [5, 6, 7])
    assert images.shape == (3, 8, 8, 3) and images.dtype == torch.uint8


def test_compare_reports_continuous_fidelity_and_real_kernels_agree(tmp_path, official_file):
    from quantcore.compare import CompareSpec, plan_rows, run_compare

    rows = [
        *plan_rows(["fp"], ["w8a8"]),
        *plan_rows(["ptq4arvg"], ["w8a8"], ["random"], ["simulated", "real"]),
    ]
    spec = CompareSpec(
        model="mar-tiny",
        checkpoint=str(official_file),
        rows=rows,
        num_images=4,
        calib_samples=4,
        heldout=8,
        batch_size=4,
        grid_images=4,
    )
    report = run_compare(spec, tmp_path)
    fp, simulated, real = report["rows"]
    assert fp["metrics"]["latent_rel_error"] == 0.0 and "token_agreement" not in simulated["metrics"]
    assert real["execution_paths"]["int8-cpu"] == 16  # qkv, proj, fc1, fc2 of the 4 blocks
    sim_err, real_err = simulated["metrics"]["condition_rel_error"], real["metrics"]["condition_rel_error"]
    assert 0.0 < sim_err and abs(real_err - sim_err) <= 0.2 * sim_err
    markdown = (tmp_path / "report.md").read_text()
    assert "diff. loss" in markdown and "logit KL" not in markdown


def _official_schedule(sampling_steps: str):
    """The respaced cosine DDPM tables, computed the way the official diffusion/ package does (numpy)."""
    n = 1000
    ab = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = np.array([min(1 - ab((i + 1) / n) / ab(i / n), 0.999) for i in range(n)])
    cumprod = np.cumprod(1.0 - betas)
    count = int(sampling_steps)
    stride = (n - 1) / (count - 1)
    kept, cur = [], 0.0
    for _ in range(count):
        kept.append(round(cur))
        cur += stride
    new_betas, last = [], 1.0
    for i, a in enumerate(cumprod):
        if i in kept:
            new_betas.append(1 - a / last)
            last = a
    b = np.array(new_betas)
    a = np.cumprod(1.0 - b)
    a_prev = np.append(1.0, a[:-1])
    var = b * (1.0 - a_prev) / (1.0 - a)
    return {
        "map": kept,
        "log_beta": np.log(b),
        "min_log": np.log(np.append(var[1], var[1:])),
        "recip": np.sqrt(1.0 / a),
        "recipm1": np.sqrt(1.0 / a - 1),
        "c1": b * np.sqrt(a_prev) / (1.0 - a),
        "c2": (1.0 - a_prev) * np.sqrt(1.0 - b) / (1.0 - a),
    }


def _official_sample_tokens(model, classes, orders, noise, cfg, temperature, num_iter, sampling_steps):
    """MAR's `sample_tokens` + `DiffLoss.sample` (forward_with_cfg, p_sample_loop) written out as the
    official code runs them, with the plan's orders and noise injected where the official draws them."""
    s = _official_schedule(sampling_steps)
    bsz, seq_len, c = classes.shape[0], model.config.num_tokens, model.config.token_dim
    mask = torch.ones(bsz, seq_len)
    tokens = torch.zeros(bsz, seq_len, c)
    for step in range(num_iter):
        cur_tokens = tokens.clone()
        labels = classes
        if cfg != 1.0:
            tokens = torch.cat([tokens, tokens])
            labels = torch.cat([classes, torch.full_like(classes, model.null_class)])
            mask = torch.cat([mask, mask])
        z = model.decode(model.encode(tokens, mask.bool(), labels), mask.bool())
        mask_len = np.floor(seq_len * np.cos(math.pi / 2.0 * (step + 1) / num_iter))
        mask_len = max(1.0, min(float(mask[:bsz].sum(-1)[0]) - 1, mask_len))
        mask_next = torch.zeros(bsz, seq_len, dtype=torch.bool)
        mask_next.scatter_(1, orders[:, : int(mask_len)], True)
        to_pred = mask[:bsz].bool() if step >= num_iter - 1 else mask[:bsz].bool() ^ mask_next
        mask = mask_next.float()
        rows = to_pred.nonzero(as_tuple=True)
        cfg_iter = 1 + (cfg - 1) * (seq_len - mask_len) / seq_len
        zc = z[:bsz][rows] if cfg == 1.0 else torch.cat([z[:bsz][rows], z[bsz:][rows]])
        step_noise = noise[rows].double()  # (N, steps, C)
        x = step_noise[:, 0]
        steps = len(s["map"])
        for i in reversed(range(steps)):
            t = torch.full((zc.shape[0],), s["map"][i])
            xin = x if cfg == 1.0 else torch.cat([x, x])
            out = model.diffloss.net(xin.float(), t, zc).double()
            eps, v = out[:, :c], out[:, c:]
            if cfg != 1.0:
                cond, uncond = eps.chunk(2)
                eps, v = uncond + cfg_iter * (cond - uncond), v[: x.shape[0]]
            x0 = s["recip"][i] * x - s["recipm1"][i] * eps
            mean = s["c1"][i] * x0 + s["c2"][i] * x
            frac = (v + 1) / 2
            log_var = frac * s["log_beta"][i] + (1 - frac) * s["min_log"][i]
            nonzero = 1.0 if i != 0 else 0.0
            drawn = step_noise[:, steps - i] if i != 0 else torch.zeros_like(x)
            x = (mean + nonzero * torch.exp(0.5 * log_var) * drawn * temperature).float().double()
        cur_tokens[rows] = x.float()
        tokens = cur_tokens.clone()
    return tokens


@pytest.mark.parametrize("cfg, temperature", [(3.0, 1.0), (1.0, 0.9)])
def test_sampler_matches_the_official_loop_written_out(cfg, temperature):
    model = random_mar(head_std=0.02)
    sampling = {**SAMPLING, "cfg_scale": cfg, "temperature": temperature}
    plan = mar.DecodePlan(model, 2, sampling, compile=False)
    classes = torch.tensor([1, 7])
    plan.reset(classes, [11, 12])
    orders, noise = plan.orders.clone(), plan.noise.clone()
    for _ in range(plan.steps):
        plan.step()
    with torch.no_grad():
        ref = _official_sample_tokens(model, classes, orders, noise, cfg, temperature, 4, "5")
    torch.testing.assert_close(plan.tokens, ref, rtol=1e-4, atol=1e-4)
