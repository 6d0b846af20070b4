import copy
import math
import warnings

import numpy as np
import pytest
import torch
from reference_sampling import reference_tokens
from torch.nn import functional as F

from quantcore.api import load_generator, quantize_job
from quantcore.artifact import load_artifact
from quantcore.calib import CalibrationSpec, build_calibration_set
from quantcore.errors import CheckpointError, ConfigError
from quantcore.fastgen import generate_tokens
from quantcore.models import bind_tokenizer
from quantcore.models.var import (
    ADA_CHUNKS,
    MAX_SCALE_MUL,
    MODELS,
    VAR,
    VARConfig,
    decode_images,
    quant_layout,
)
from quantcore.pipeline import quantize
from quantcore.quant.layout import AdaLNRows
from quantcore.quant.modules import QuantLinear, set_quant_mode
from quantcore.recipe import PRESETS, Recipe
from quantcore.registry import RandomWeightsWarning, load_model
from quantcore.tokenizers import build_tokenizer, load_tokenizer
from quantcore.tokenizers.var_vqvae import (
    VAR_VQ_CONFIGS,
    VQVAE,
    bicubic_upsample,
    phi_index,
    separable_bicubic,
)

TINY = MODELS["var-tiny"]


@pytest.fixture(autouse=True)
def _quiet_random_weight_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        yield


def random_var(seed: int = 0, dtype=torch.float32, std: float = 0.3) -> tuple[VAR, VQVAE]:
    """var-tiny with every parameter random (q/v biases included), and its tokenizer, bound."""
    torch.manual_seed(seed)
    model = VAR(TINY.config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    tokenizer = build_tokenizer(TINY.config.tokenizer).to(dtype)
    bind_tokenizer(model, tokenizer)
    return model, tokenizer


def random_tokens(n: int, seed: int = 0) -> torch.Tensor:
    cfg = TINY.config
    return torch.randint(
        0, cfg.vocab_size, (n, cfg.num_tokens), generator=torch.Generator().manual_seed(seed)
    )


def rel_err(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


# ---------------------------------------------------------------------------------------------------
# Architecture, sizes and official key names
# ---------------------------------------------------------------------------------------------------


def official_count(depth: int) -> int:
    """Parameters of build_vae_var(depth=d): C = 64 d, H = d, V = 4096, Cvae = 32, 1000 classes, L = 680."""
    c, h = 64 * depth, depth
    block = (6 * c * c + 6 * c) + 3 * c * c + 2 * c + h + (c * c + c) + (4 * c * c + 4 * c) + (4 * c * c + c)
    embeds = (32 * c + c) + 1001 * c + c + 680 * c + 10 * c
    head = (2 * c * c + 2 * c) + (4096 * c + 4096)
    return depth * block + embeds + head


# The VAR README's sizes, to their printed precision.
README = {16: ("M", 310), 20: ("M", 600), 24: ("B", 1.0), 30: ("B", 2.0)}


@pytest.mark.parametrize("depth", [16, 20, 24, 30])
def test_full_size_parameter_counts(depth):
    with torch.device("meta"):
        model = VAR(MODELS[f"var-d{depth}"].config)
    count = sum(p.numel() for p in model.parameters())
    assert count == official_count(depth)
    unit, value = README[depth]
    if unit == "M":
        assert abs(count / 1e6 - value) / value < 0.01, count
    else:
        assert round(count / 1e9, 1) == value, count


def test_official_key_names():
    with torch.device("meta"):
        sd = VAR(MODELS["var-d16"].config).state_dict()
    per_block = {
        "ada_lin.1.weight": (6144, 1024),
        "ada_lin.1.bias": (6144,),
        "attn.scale_mul_1H11": (1, 16, 1, 1),
        "attn.q_bias": (1024,),
        "attn.v_bias": (1024,),
        "attn.zero_k_bias": (1024,),
        "attn.mat_qkv.weight": (3072, 1024),
        "attn.proj.weight": (1024, 1024),
        "attn.proj.bias": (1024,),
        "ffn.fc1.weight": (4096, 1024),
        "ffn.fc1.bias": (4096,),
        "ffn.fc2.weight": (1024, 4096),
        "ffn.fc2.bias": (1024,),
    }
    expected = {
        "word_embed.weight": (1024, 32),
        "word_embed.bias": (1024,),
        "class_emb.weight": (1001, 1024),
        "pos_start": (1, 1, 1024),
        "pos_1LC": (1, 680, 1024),
        "lvl_embed.weight": (10, 1024),
        "lvl_1L": (1, 680),
        "attn_bias_for_masking": (1, 1, 680, 680),
        "head_nm.ada_lin.1.weight": (2048, 1024),
        "head_nm.ada_lin.1.bias": (2048,),
        "head.weight": (4096, 1024),
        "head.bias": (4096,),
    }
    expected |= {f"blocks.{i}.{k}": s for i in range(16) for k, s in per_block.items()}
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected  # no mat_qkv.bias, no caches, no `one`


def test_mask_levels_and_clamp_constant():
    model = VAR(TINY.config)
    lvl = model.lvl_1L[0].tolist()
    assert lvl == [0] + [1] * 4 + [2] * 9 + [3] * 16
    bias = model.attn_bias_for_masking[0, 0]
    allowed = bias == 0
    assert allowed[0, 0] and not allowed[0, 1] and allowed[4, 1:5].all() and not allowed[4, 5]
    assert allowed[29].all() and torch.isinf(bias[~allowed]).all()
    assert MAX_SCALE_MUL == torch.log(torch.tensor(100)).item()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 13])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-14), (torch.float32, 1e-6)])
def test_the_separable_bicubic_sum_is_the_official_resize(n, dtype, tol):
    """What CUDA runs instead of F.interpolate's bicubic kernel, here on the CPU against the official call."""
    h = torch.randn(3, 4, n, n, dtype=dtype, generator=torch.Generator().manual_seed(n))
    ref = F.interpolate(h, size=(16, 16), mode="bicubic")
    assert float((separable_bicubic(h, 16) - ref).abs().max() / ref.abs().max()) < tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bicubic_upsampling_on_cuda_agrees_with_the_kernel(dtype):
    h = torch.randn(128, 32, 13, 13, device="cuda", generator=torch.Generator("cuda").manual_seed(0)).to(
        dtype
    )
    ref = F.interpolate(h.float(), size=(16, 16), mode="bicubic")
    err = float((bicubic_upsample(h, 16).float() - ref).abs().max() / ref.abs().max())
    assert err < (1e-6 if dtype == torch.float32 else 8e-3), err  # bf16: one rounding (2^-8) of either


def test_vqvae_size_keys_and_shared_phi():
    with torch.device("meta"):
        vae = VQVAE(VAR_VQ_CONFIGS["VAR-VQVAE"])
    sd = vae.state_dict()
    count = sum(p.numel() for p in vae.parameters())
    assert abs(count - 108.95e6) / 108.95e6 < 0.01, count  # vae_ch160v4096z32: ~109M
    for key, shape in {
        "encoder.conv_in.weight": (160, 3, 3, 3),
        "encoder.down.2.block.0.nin_shortcut.weight": (320, 160, 1, 1),
        "encoder.down.4.attn.1.qkv.weight": (1920, 640, 1, 1),
        "encoder.down.3.downsample.conv.weight": (320, 320, 3, 3),
        "encoder.mid.attn_1.proj_out.weight": (640, 640, 1, 1),
        "encoder.conv_out.weight": (32, 640, 3, 3),
        "decoder.up.4.attn.2.norm.weight": (640,),
        "decoder.up.1.upsample.conv.weight": (160, 160, 3, 3),
        "decoder.up.0.block.2.conv2.weight": (160, 160, 3, 3),
        "quantize.embedding.weight": (4096, 32),
        "quantize.ema_vocab_hit_SV": (10, 4096),
        "quantize.quant_resi.qresi_ls.3.weight": (32, 32, 3, 3),
        "quant_conv.weight": (32, 32, 3, 3),
        "post_quant_conv.weight": (32, 32, 3, 3),
    }.items():
        assert tuple(sd[key].shape) == shape, key
    assert "decoder.up.0.upsample.conv.weight" not in sd and "encoder.down.4.downsample.conv.weight" not in sd
    assert "encoder.down.0.block.0.nin_shortcut.weight" not in sd  # identity shortcut: no keys
    # 4 phi convs for 10 scales; the exact ties 2/9 and 7/9 resolve as the official float64 argmin
    # does (checked against the official PhiPartiallyShared)
    assert phi_index(4, 10) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert phi_index(4, 4) == [0, 1, 2, 3]
    assert VAR_VQ_CONFIGS["VAR-VQVAE"].image_size == 256


# ---------------------------------------------------------------------------------------------------
# Official checkpoints: strict loading, the qkv bias, agreement with the official computation
# ---------------------------------------------------------------------------------------------------


def reference_logits(sd: dict, vq_sd: dict, cfg: VARConfig, labels: torch.Tensor, tokens: torch.Tensor):
    """The official `VAR.forward` (teacher forcing, attn_bias_for_masking) on the official
    `idxBl_to_var_input`, written directly against the state dicts."""
    pn, c, heads = cfg.patch_nums, cfg.embed_dim, cfg.num_heads
    b, n_scales, grid, cvae = tokens.shape[0], len(pn), pn[-1], cfg.cvae
    emb = vq_sd["quantize.embedding.weight"]
    ticks = np.linspace(1 / 12, 1 - 1 / 12, 4)

    def phi(h, si):
        k = np.argmin(np.abs(ticks - si / (n_scales - 1))).item()
        conv = F.conv2d(
            h,
            vq_sd[f"quantize.quant_resi.qresi_ls.{k}.weight"],
            vq_sd[f"quantize.quant_resi.qresi_ls.{k}.bias"],
            padding=1,
        )
        return h.mul(0.5) + conv.mul(0.5)

    f_hat = emb.new_zeros(b, cvae, grid, grid)
    nexts, start = [], 0
    for si in range(n_scales - 1):
        idx = tokens[:, start : start + pn[si] ** 2]
        start += pn[si] ** 2
        h = F.interpolate(
            emb[idx].transpose(1, 2).reshape(b, cvae, pn[si], pn[si]), size=(grid, grid), mode="bicubic"
        )
        f_hat = f_hat + phi(h, si)
        nexts.append(
            F.interpolate(f_hat, size=(pn[si + 1], pn[si + 1]), mode="area").view(b, cvae, -1).transpose(1, 2)
        )
    cond = sd["class_emb.weight"][labels]
    x = torch.cat(
        [
            cond[:, None] + sd["pos_start"],
            F.linear(torch.cat(nexts, 1), sd["word_embed.weight"], sd["word_embed.bias"]),
        ],
        1,
    )
    x = x + sd["lvl_embed.weight"][sd["lvl_1L"]] + sd["pos_1LC"]
    length = x.shape[1]

    def ln(t):
        return F.layer_norm(t, (c,), eps=1e-6)

    for i in range(cfg.depth):
        p = f"blocks.{i}."
        g1, g2, s1, s2, sh1, sh2 = (
            F.linear(F.silu(cond), sd[p + "ada_lin.1.weight"], sd[p + "ada_lin.1.bias"])
            .view(-1, 1, 6, c)
            .unbind(2)
        )
        h = ln(x).mul(s1.add(1)).add(sh1)
        bias = torch.cat((sd[p + "attn.q_bias"], sd[p + "attn.zero_k_bias"], sd[p + "attn.v_bias"]))
        qkv = F.linear(h, sd[p + "attn.mat_qkv.weight"], bias).view(b, length, 3, heads, c // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q = F.normalize(q, dim=-1).mul(sd[p + "attn.scale_mul_1H11"].clamp_max(math.log(100)).exp())
        k = F.normalize(k, dim=-1)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=sd["attn_bias_for_masking"].to(q.dtype), scale=1.0
        )
        x = (
            x
            + F.linear(
                o.transpose(1, 2).reshape(b, length, c), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"]
            )
            * g1
        )
        h = ln(x).mul(s2.add(1)).add(sh2)
        mid = F.gelu(F.linear(h, sd[p + "ffn.fc1.weight"], sd[p + "ffn.fc1.bias"]), approximate="tanh")
        x = x + F.linear(mid, sd[p + "ffn.fc2.weight"], sd[p + "ffn.fc2.bias"]) * g2
    scale, shift = (
        F.linear(F.silu(cond), sd["head_nm.ada_lin.1.weight"], sd["head_nm.ada_lin.1.bias"])
        .view(-1, 1, 2, c)
        .unbind(2)
    )
    return F.linear(ln(x).mul(scale.add(1)).add(shift), sd["head.weight"], sd["head.bias"])


def test_logits_match_the_official_computation():
    model, tokenizer = random_var(dtype=torch.float64)
    with torch.no_grad():
        model.blocks[0].attn.scale_mul_1H11[0, 0] = 5.0  # above log(100): the clamp must bite
    labels, tokens = torch.tensor([1, 4, 10]), random_tokens(3)  # 10 = the null class
    ref = reference_logits(model.state_dict(), tokenizer.state_dict(), TINY.config, labels, tokens)
    torch.testing.assert_close(model.sequence_logits(labels, tokens), ref.float(), rtol=1e-5, atol=1e-5)
    # the q/v bias is live: zeroing it changes the logits
    without = copy.deepcopy(model)
    with torch.no_grad():
        for block in without.blocks:
            block.attn.q_bias.zero_()
            block.attn.v_bias.zero_()
    assert rel_err(without.sequence_logits(labels, tokens), ref.float()) > 1e-3


def test_official_layout_checkpoints_load_strictly_and_give_the_same_logits(tmp_path):
    model, tokenizer = random_var()
    # the VAR release files are plain state dicts (torch.save(state_dict)); so is vae_ch160v4096z32.pth
    torch.save(model.state_dict(), tmp_path / "var_tiny.pth")
    torch.save(tokenizer.state_dict(), tmp_path / "vae.pth")
    loaded = load_model("var-tiny", tmp_path / "var_tiny.pth")
    vae = load_tokenizer("VAR-VQVAE-tiny", tmp_path / "vae.pth")
    bind_tokenizer(loaded, vae)
    assert loaded.blocks[0].attn.mat_qkv.bias is None  # the checkpoint's q/v bias lives in q_bias/v_bias
    labels, tokens = torch.tensor([0, 7]), random_tokens(2, seed=1)
    assert torch.equal(loaded.sequence_logits(labels, tokens), model.sequence_logits(labels, tokens))
    gen_a = generate_tokens(loaded, labels, [5, 6])
    assert torch.equal(gen_a, generate_tokens(model, labels, [5, 6]))
    assert torch.equal(decode_images(loaded, vae, gen_a), decode_images(model, tokenizer, gen_a))


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda sd: sd.pop("blocks.1.attn.q_bias"), "missing: blocks.1.attn.q_bias"),
        (lambda sd: sd.pop("attn_bias_for_masking"), "missing: attn_bias_for_masking"),
        # a PTQ4ARVG-post-processed file (bias copied into mat_qkv) must not double the bias
        (
            lambda sd: sd.__setitem__("blocks.0.attn.mat_qkv.bias", torch.zeros(192)),
            "unexpected: blocks.0.attn.mat_qkv.bias",
        ),
        (lambda sd: sd.__setitem__("head.weight", torch.zeros(65, 64)), "wrong shape: head.weight"),
    ],
)
def test_bad_var_checkpoints_name_the_key(tmp_path, edit, named):
    sd = random_var()[0].state_dict()
    edit(sd)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=named):
        load_model("var-tiny", tmp_path / "bad.pth")


def test_bad_vqvae_checkpoints_name_the_key(tmp_path):
    sd = build_tokenizer("VAR-VQVAE-tiny").state_dict()
    sd.pop("quantize.quant_resi.qresi_ls.3.bias")
    sd["decoder.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(
        CheckpointError, match="missing: quantize.quant_resi.qresi_ls.3.bias.*unexpected: decoder.extra"
    ):
        load_tokenizer("VAR-VQVAE-tiny", tmp_path / "bad.pth")
    # the training-time hit statistics may be stored for another number of scales (official tolerance)
    good = build_tokenizer("VAR-VQVAE-tiny").state_dict()
    good["quantize.ema_vocab_hit_SV"] = torch.ones(7, 64)
    torch.save(good, tmp_path / "ema.pth")
    assert load_tokenizer("VAR-VQVAE-tiny", tmp_path / "ema.pth").quantize.ema_vocab_hit_SV.shape == (4, 64)


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # official: cfg 1.5, top-k 900, top-p 0.96
        {"cfg_scale": 0.0},
        {"cfg_scale": 0.5, "top_k": 8, "top_p": 0.8, "temperature": 1.3},
    ],
)
def test_cached_and_uncached_sampling_agree_token_for_token(kwargs):
    model, _ = random_var(dtype=torch.float64)
    classes = torch.tensor([1, 5, 9])
    cached = generate_tokens(model, classes, [3, 4, 5], **kwargs)
    full = reference_tokens(model, classes, [3, 4, 5], **kwargs)
    assert torch.equal(cached, full)
    assert len(set(cached.flatten().tolist())) > 4  # not a degenerate constant sequence


def test_cached_logits_equal_teacher_forced_logits():
    model, _ = random_var(dtype=torch.float64)
    classes = torch.tensor([2, 3])
    tokens = generate_tokens(model, classes, [0, 1], cfg_scale=0.0)
    teacher = model.sequence_logits(classes, tokens)
    vq, cfg = model.quantizer, model.config
    cond, lvl_pos = model.class_emb(classes), model.lvl_pos()
    x = model.first_scale_input(cond, lvl_pos)
    f_hat = vq.embedding.weight.new_zeros(2, cfg.cvae, cfg.grid_size, cfg.grid_size)
    model.setup_caches(2)
    collected = []
    for si, (start, end) in enumerate(cfg.scale_bounds):
        collected.append(model(x, cond, torch.arange(start, end), use_cache=True))
        if si + 1 < cfg.num_scales:
            f_hat, nxt = vq.next_autoregressive_input(si, f_hat, vq.code_map(tokens, si))
            x = model.scale_input(nxt.flatten(2).transpose(1, 2), end, lvl_pos)
    model.clear_caches()
    torch.testing.assert_close(torch.cat(collected, dim=1), teacher, rtol=1e-5, atol=1e-5)
    # the official (unmasked) calibration pass is an option, and it differs after the first scale
    model.teacher_forcing_mask = False
    unmasked = model.sequence_logits(classes, tokens)
    assert rel_err(unmasked, teacher) > 1e-3
    torch.testing.assert_close(unmasked, model.sequence_logits(classes, tokens, masked=False))


def test_seed_determines_image_independent_of_batch_and_bad_arguments():
    model, _ = random_var()
    alone = generate_tokens(model, torch.tensor([4]), [11])
    batched = generate_tokens(model, torch.tensor([1, 4, 7]), [10, 11, 12])
    assert torch.equal(alone[0], batched[1]) and not torch.equal(batched[0], batched[1])
    with pytest.raises(ConfigError, match="one seed per image"):
        generate_tokens(model, torch.tensor([1, 2]), [0])
    with pytest.raises(ConfigError, match="more_smooth"):
        generate_tokens(model, torch.tensor([1]), [0], more_smooth=True)


def test_tokenizer_must_be_bound_and_match():
    model = VAR(TINY.config)
    with pytest.raises(ConfigError, match="bind_tokenizer"):
        model.sequence_logits(torch.tensor([1]), random_tokens(1))
    with pytest.raises(ConfigError, match="does not match"):
        bind_tokenizer(model, build_tokenizer("VAR-VQVAE"))
    with pytest.raises(ConfigError, match="multi-scale VQ-VAE"):
        bind_tokenizer(model, build_tokenizer("VQ-tiny"))
    bind_tokenizer(model, build_tokenizer("VAR-VQVAE-tiny"))
    assert "quantize" not in " ".join(model.state_dict())  # the tokenizer stays out of the model


def test_tokenizer_round_trip_shapes():
    vae = build_tokenizer("VAR-VQVAE-tiny")
    images = torch.randint(
        0, 256, (2, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    tokens = vae.encode_to_tokens(images)
    assert tokens.shape == (2, 30) and int(tokens.max()) < 64
    out = vae.decode_tokens(tokens)
    assert out.shape == (2, 8, 8, 3) and out.dtype == torch.uint8
    # the teacher-forcing input of a prefix is the prefix of the full one
    full = vae.quantize.tokens_to_var_input(tokens)
    assert full.shape == (2, 29, 8)
    torch.testing.assert_close(vae.quantize.tokens_to_var_input(tokens[:, :5]), full[:, :13])
    with pytest.raises(ConfigError, match="whole number of scales"):
        vae.quantize.tokens_to_var_input(tokens[:, :7])


# ---------------------------------------------------------------------------------------------------
# Quantization layout and folding
# ---------------------------------------------------------------------------------------------------


def test_layout_matches_the_reference():
    with torch.device("meta"):
        model = VAR(MODELS["var-d16"].config)
    layout = quant_layout(model)
    assert layout.seq_len == 680 and layout.sink_positions == (0,)
    assert ADA_CHUNKS == ("gamma1", "gamma2", "scale1", "scale2", "shift1", "shift2")
    qkv, fc1 = layout.fold_sites[0], layout.fold_sites[1]
    assert qkv.producer == AdaLNRows("blocks.0.ada_lin.1", 6, 2, 4, "blocks.0.one1") and qkv.linears == (
        "blocks.0.attn.mat_qkv",
    )
    assert fc1.producer == AdaLNRows("blocks.0.ada_lin.1", 6, 3, 5, "blocks.0.one2") and fc1.linears == (
        "blocks.0.ffn.fc1",
    )
    head = layout.fold_sites[-1]
    assert head.producer == AdaLNRows("head_nm.ada_lin.1", 2, 0, 1, "head_nm.one")
    assert head.linears == ("head",) and head.head and head.gps  # VAR's head is in GPS
    assert len(layout.fold_sites) == 2 * 16 + 1 and all(s.gps for s in layout.fold_sites)
    # STWQ: mat_qkv/fc1 one group per scale, proj/fc2 first token vs rest, AdaLN inputs per-tensor
    groups = layout.groups_for("blocks.3.attn.mat_qkv", per_position=False)
    sizes = torch.bincount(groups).tolist()
    assert sizes == [1, 4, 9, 16, 25, 36, 64, 100, 169, 256]
    for name in ("blocks.3.attn.proj", "blocks.3.ffn.fc2"):
        assert torch.bincount(layout.groups_for(name, per_position=False)).tolist() == [1, 679]
    for name in ("blocks.3.ada_lin.1", "head_nm.ada_lin.1"):
        assert int(layout.groups_for(name, per_position=False).max()) == 0
        assert int(layout.groups_for(name, per_position=True).max()) == 0  # no token axis
    assert layout.groups_for("blocks.3.ffn.fc2", per_position=True).tolist() == list(range(680))
    assert "word_embed" not in layout.all_linears and "blocks.15.ada_lin.1" in layout.all_linears
    assert len(layout.all_linears) == 16 * 5 + 2 and len(layout.matmuls) == 32
    assert layout.feature_module == "blocks.15" and not layout.log_sqrt2_probs


@pytest.fixture(scope="module")
def calibrated():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        fp, _ = random_var()
        calib = build_calibration_set(
            fp, CalibrationSpec(num_samples=8, batch_size=8), TINY.sampling.to_dict()
        )
    return fp, calib


@pytest.mark.parametrize("preset", ["smoothquant", "os+", "gps", "ptq4arvg"])
def test_folding_into_adaln_rows_is_exact_with_quantization_off(calibrated, preset):
    fp, calib = calibrated
    model = copy.deepcopy(fp)
    quantize(model, Recipe.preset(preset, 6, 6), calib)
    set_quant_mode(model, weights="off", acts="off")
    ref = fp.sequence_logits(calib.classes, calib.tokens)
    assert rel_err(model.sequence_logits(calib.classes, calib.tokens), ref) <= 1e-5
    c = model.config.embed_dim
    block, fp_block = model.blocks[0], fp.blocks[0]
    # the "1 +" became 1/s; the gamma rows are untouched, scale/shift rows carry the scales
    assert block.one1 is not None and block.one2 is not None and model.head_nm.one is not None
    ada, fp_ada = block.ada_lin[1].weight, fp_block.ada_lin[1].weight
    assert torch.equal(ada[: 2 * c], fp_ada[: 2 * c])
    assert not torch.equal(ada[2 * c : 3 * c], fp_ada[2 * c : 3 * c])
    assert not torch.equal(model.head_nm.ada_lin[1].weight, fp.head_nm.ada_lin[1].weight)
    # the checkpoint bias is untouched; a shift lands in mat_qkv.bias (read by the quantized linear)
    assert torch.equal(block.attn.q_bias, fp_block.attn.q_bias)
    if preset in ("os+", "ptq4arvg"):
        assert block.attn.mat_qkv.bias is not None and model.head.bias is not None
        assert not torch.equal(model.head.bias, fp.head.bias)
        assert not torch.equal(block.ada_lin[1].bias[4 * c : 5 * c], fp_block.ada_lin[1].bias[4 * c : 5 * c])
    else:
        assert block.attn.mat_qkv.bias is None


def test_final_quantizers_and_stwq_during_kv_decoding(calibrated):
    fp, calib = calibrated
    model = copy.deepcopy(fp).double()
    model.bind_quantizer(copy.deepcopy(fp.quantizer).double())
    # The official calibration forward is unmasked, so the probabilities' range need not reach 0: the
    # full recomputation's masked (zero) probabilities would then not decode to 0, where the cache has
    # none. The cache-against-recomputation check calibrates with the causal mask.
    recipe = Recipe.preset("ptq4arvg", 8, 8)
    recipe = recipe.model_copy(
        update={"calibration": recipe.calibration.model_copy(update={"causal_mask": True})}
    )
    quantize(model, recipe, calib)
    kinds = {
        name: model.get_submodule(name).input_quantizer
        for name in (
            "blocks.1.attn.mat_qkv",
            "blocks.1.ffn.fc1",
            "blocks.1.attn.proj",
            "blocks.1.ffn.fc2",
            "blocks.1.ada_lin.1",
            "head_nm.ada_lin.1",
            "head",
        )
    }
    assert [(q.granularity, q.num_params) for q in kinds.values()] == [
        ("group", 4),
        ("group", 4),
        ("group", 2),
        ("group", 2),
        ("tensor", 1),
        ("tensor", 1),
        ("tensor", 1),
    ]
    q = kinds["blocks.1.attn.mat_qkv"]
    assert len(set(q.scale.tolist())) == 4  # every scale got its own calibration
    seen, original = [], q.params_for

    def spy(x, pos):
        seen.append(pos.clone())
        return original(x, pos)

    q.params_for = spy
    cached = generate_tokens(model, torch.tensor([1, 2]), [0, 1])
    q.params_for = original
    assert [p.tolist() for p in seen] == [list(range(s, e)) for s, e in model.config.scale_bounds]
    assert torch.equal(cached, reference_tokens(model, torch.tensor([1, 2]), [0, 1]))


def test_per_position_stwq_keeps_adaln_inputs_per_tensor(calibrated):
    fp, calib = calibrated
    model = copy.deepcopy(fp)
    recipe = Recipe.parse({"w_bits": 8, "a_bits": 8, "passes": [{"kind": "stwq", "mode": "per_position"}]})
    quantize(model, recipe, calib)
    assert model.blocks[0].attn.mat_qkv.input_quantizer.num_params == 30
    assert model.blocks[0].ada_lin[1].input_quantizer.granularity == "tensor"
    assert isinstance(model.head, QuantLinear) and model.head.input_quantizer.granularity == "tensor"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_runs_end_to_end_and_round_trips(tmp_path, preset):
    spec = {
        "model": "var-tiny",
        "recipe": preset,
        "w_bits": 6,
        "a_bits": 6,
        "calibration": {"num_samples": 4, "batch_size": 4},
        "evaluation": {"num_images": 2},
    }
    manifest = quantize_job(spec, tmp_path / "art")
    assert manifest["recipe"]["name"] == preset and manifest["model"]["family"] == "var"
    assert 0.0 <= manifest["metrics"]["token_agreement"] <= 1.0
    model, tokenizer, loaded = load_artifact(tmp_path / "art")
    assert loaded["layers"] == manifest["layers"] and "blocks.0.ada_lin.1" in loaded["layers"]
    again, _, _ = load_artifact(tmp_path / "art")
    classes, tokens = torch.tensor([1, 2]), random_tokens(2, seed=3)
    assert torch.equal(model.sequence_logits(classes, tokens), again.sequence_logits(classes, tokens))
    images = load_generator(str(tmp_path / "art")).generate([1, 2], [5, 6])
    assert images.shape == (2, 8, 8, 3) and images.dtype == torch.uint8


def test_weight_only_job(tmp_path):
    quantize_job(
        {
            "model": "var-tiny",
            "recipe": "rtn",
            "w_bits": 4,
            "a_bits": None,
            "calibration": {"num_samples": 4, "batch_size": 4},
            "evaluation": {"num_images": 0},
        },
        tmp_path / "w4",
    )
    model, _, _ = load_artifact(tmp_path / "w4")
    lin = model.blocks[0].attn.mat_qkv
    assert lin.weight_quantizer.n_bits == 4 and lin.input_quantizer.mode == "off"
