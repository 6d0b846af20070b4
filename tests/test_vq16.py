"""LlamaGen's VQ tokenizer: official key layout and size, encode/decode, strict checkpoint loading."""

from __future__ import annotations

import pytest
import torch

from quantcore.errors import CheckpointError, ConfigError
from quantcore.tokenizers import VQ_CONFIGS, VQConfig, VQModel, load_vq


def official_param_count(cfg: VQConfig) -> int:
    """Parameters of the official architecture, counted layer by layer from its description."""

    def conv(k: int, i: int, o: int) -> int:
        return k * k * i * o + o

    def norm(c: int) -> int:
        return 2 * c

    def res(i: int, o: int) -> int:
        return norm(i) + conv(3, i, o) + norm(o) + conv(3, o, o) + (conv(1, i, o) if i != o else 0)

    def attn(c: int) -> int:
        return norm(c) + 4 * conv(1, c, c)

    widths = [cfg.ch * m for m in cfg.ch_mult]
    top, n, levels = widths[-1], cfg.num_res_blocks, len(widths)
    mid = 2 * res(top, top) + attn(top)

    enc, c_in = conv(3, cfg.image_channels, cfg.ch), cfg.ch
    for level, w in enumerate(widths):
        enc += res(c_in, w) + (n - 1) * res(w, w)
        enc += n * attn(w) if level == levels - 1 else conv(3, w, w)  # attention or downsample
        c_in = w
    enc += mid + norm(top) + conv(3, top, cfg.z_channels)

    dec, c_in = conv(3, cfg.z_channels, top) + mid, top
    for level, w in enumerate(reversed(widths)):
        dec += res(c_in, w) + n * res(w, w)
        dec += (n + 1) * attn(w) if level == 0 else 0
        dec += conv(3, w, w) if level != levels - 1 else 0  # upsample
        c_in = w
    dec += norm(widths[0]) + conv(3, widths[0], cfg.image_channels)

    d, z = cfg.codebook_embed_dim, cfg.z_channels
    return enc + dec + cfg.codebook_size * d + conv(1, z, d) + conv(1, d, z)


def tiny(seed: int = 0) -> VQModel:
    torch.manual_seed(seed)
    return VQModel(VQ_CONFIGS["VQ-tiny"]).eval()


def save_official(sd: dict[str, torch.Tensor], path) -> None:
    torch.save({"model": sd}, path)  # the layout of vq_ds16_c2i.pt


def test_vq16_size_and_key_layout_match_the_official_checkpoint():
    cfg = VQ_CONFIGS["VQ-16"]
    with torch.device("meta"):
        model = VQModel(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == official_param_count(cfg) == 71_883_403
    assert abs(n - 71.9e6) / 71.9e6 < 1e-3  # LlamaGen reports its VQ tokenizer as ~72M parameters
    assert model.downsample_factor == 16

    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 344
    prefixes = {
        "encoder.conv_in.",
        "encoder.conv_blocks.",
        "encoder.mid.",
        "encoder.norm_out.",
        "encoder.conv_out.",
        "quant_conv.",
        "quantize.embedding.weight",
        "quantize.codebook_used",
        "post_quant_conv.",
        "decoder.conv_in.",
        "decoder.mid.",
        "decoder.conv_blocks.",
        "decoder.norm_out.",
        "decoder.conv_out.",
    }
    assert {p for p in prefixes if any(k.startswith(p) for k in shapes)} == prefixes
    assert all(any(k.startswith(p) for p in prefixes) for k in shapes)

    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.conv_blocks.0.res.1.conv1.weight": (128, 128, 3, 3),
        "encoder.conv_blocks.2.res.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.conv_blocks.3.downsample.conv.weight": (256, 256, 3, 3),
        "encoder.conv_blocks.4.attn.1.q.weight": (512, 512, 1, 1),
        "encoder.mid.1.proj_out.bias": (512,),
        "encoder.mid.2.conv2.weight": (512, 512, 3, 3),
        "encoder.norm_out.weight": (512,),
        "encoder.conv_out.weight": (256, 512, 3, 3),
        "quant_conv.weight": (8, 256, 1, 1),
        "quantize.embedding.weight": (16384, 8),
        "quantize.codebook_used": (65536,),
        "post_quant_conv.weight": (256, 8, 1, 1),
        "decoder.conv_in.weight": (512, 256, 3, 3),
        "decoder.mid.0.norm1.weight": (512,),
        "decoder.conv_blocks.0.res.2.conv2.weight": (512, 512, 3, 3),
        "decoder.conv_blocks.0.attn.2.v.weight": (512, 512, 1, 1),
        "decoder.conv_blocks.0.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.conv_blocks.1.res.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.conv_blocks.3.res.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    assert {k: shapes.get(k) for k in expected} == expected
    # Attention only at the lowest resolution; no resampling past the last level.
    assert not any(
        ".attn." in k for k in shapes if k.startswith(("encoder.conv_blocks.3", "decoder.conv_blocks.1"))
    )
    assert not any(
        k.startswith(("encoder.conv_blocks.4.downsample", "decoder.conv_blocks.4.upsample")) for k in shapes
    )


def test_configs():
    assert VQ_CONFIGS["VQ-16"].downsample_factor == 16
    assert VQ_CONFIGS["VQ-8"].downsample_factor == 8
    cfg = VQ_CONFIGS["VQ-tiny"]
    assert cfg.downsample_factor == 2 ** (len(cfg.ch_mult) - 1) == 2
    with pytest.raises(ConfigError, match="norm_groups"):
        VQConfig(ch=16, norm_groups=32)
    with pytest.raises(ConfigError, match="ch_mult"):
        VQConfig(ch_mult=())


def test_tiny_config_keeps_every_code_path():
    model = tiny()
    assert sum(p.numel() for p in model.parameters()) == official_param_count(model.config)
    keys = model.state_dict().keys()
    for part in (
        "encoder.conv_blocks.0.downsample.conv.weight",
        "encoder.conv_blocks.1.res.0.nin_shortcut.weight",
        "encoder.conv_blocks.1.attn.0.q.weight",
        "encoder.mid.1.k.weight",
        "decoder.mid.2.conv1.weight",
        "decoder.conv_blocks.0.attn.1.proj_out.weight",
        "decoder.conv_blocks.0.upsample.conv.weight",
        "decoder.conv_blocks.1.res.0.nin_shortcut.weight",
        "quantize.codebook_used",
    ):
        assert part in keys


def test_tiny_encode_decode_shapes_and_dtypes():
    model = tiny()
    images = torch.randint(0, 256, (2, 8, 12, 3), dtype=torch.uint8)
    tokens = model.encode_to_tokens(images)
    assert tokens.dtype == torch.long and tokens.shape == (2, 4 * 6)
    assert 0 <= tokens.min() and tokens.max() < model.config.codebook_size
    # A float image in [-1, 1] takes the same path as its uint8 form.
    floats = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(model.encode_to_tokens(floats), tokens)

    decoded = model.decode_tokens(tokens, grid=(4, 6))
    assert decoded.dtype == torch.uint8 and decoded.shape == (2, 8, 12, 3)
    assert model.decode_tokens(tokens[:, :16]).shape == (2, 8, 8, 3)  # square grid by default


def test_codes_are_unit_norm_and_lookup_is_nearest():
    model = tiny()
    codebook = model.quantize.codebook()
    assert codebook.shape == (64, 8)
    torch.testing.assert_close(codebook.norm(dim=-1), torch.ones(64))

    images = torch.rand(3, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        codes, ids = model.encode(images)
        latents = model.quant_conv(model.encoder(images))
    torch.testing.assert_close(codes.norm(dim=1), torch.ones(3, 4, 4))
    # Nearest code to the l2-normalised latent is the one with the highest cosine similarity.
    cosine = torch.nn.functional.normalize(latents.permute(0, 2, 3, 1).reshape(-1, 8), dim=-1) @ codebook.T
    assert torch.equal(ids.flatten(), cosine.argmax(1))
    assert torch.equal(codes, model.quantize.lookup(ids.view(3, 4, 4)))


def test_pixel_conversion_rounds_and_clamps(monkeypatch):
    model = tiny()
    values = torch.tensor([-3.0, -1.0, -0.999, 0.0, 0.5, 1.0, 2.5])
    monkeypatch.setattr(model, "decode_codes", lambda codes: values.view(1, 1, 1, 7).expand(1, 3, 1, 7))
    out = model.decode_tokens(torch.zeros(1, 1, dtype=torch.long), grid=(1, 1))
    expected = torch.tensor([0, 0, 0, 128, 191, 255, 255], dtype=torch.uint8)  # round((x + 1) * 127.5)
    assert torch.equal(out[0, 0, :, 0], expected) and torch.equal(out[0, 0, :, 2], expected)


def test_decode_is_deterministic():
    model = tiny()
    tokens = torch.randint(0, 64, (2, 16))
    assert torch.equal(model.decode_tokens(tokens), model.decode_tokens(tokens.clone()))


def test_input_errors():
    model = tiny()
    with pytest.raises(ConfigError, match="multiple"):
        model.encode_to_tokens(torch.zeros(1, 7, 8, 3, dtype=torch.uint8))
    with pytest.raises(ConfigError, match=r"\(B, H, W, 3\)"):
        model.encode_to_tokens(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="square"):
        model.decode_tokens(torch.zeros(1, 12, dtype=torch.long))
    with pytest.raises(ConfigError, match="grid"):
        model.decode_tokens(torch.zeros(1, 12, dtype=torch.long), grid=(3, 5))
    with pytest.raises(ConfigError, match="token ids"):
        model.decode_tokens(torch.full((1, 4), 64, dtype=torch.long))


def test_official_layout_checkpoint_loads_strictly(tmp_path):
    source = tiny(seed=1)
    path = tmp_path / "vq_tiny.pt"
    save_official(source.state_dict(), path)
    loaded = load_vq(path, "VQ-tiny")
    assert not loaded.training
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    tokens = torch.randint(0, 64, (1, 16))
    assert torch.equal(loaded.decode_tokens(tokens), source.decode_tokens(tokens))


def _mutations():
    return {
        "missing": lambda sd: sd.pop("decoder.conv_blocks.0.attn.1.q.weight"),
        "extra": lambda sd: sd.__setitem__("decoder.conv_blocks.0.attn.9.q.weight", torch.zeros(1)),
        "shape": lambda sd: sd.__setitem__(
            "decoder.conv_blocks.0.attn.1.q.weight", torch.zeros(32, 32, 3, 3)
        ),
    }


@pytest.mark.parametrize("kind", ["missing", "extra", "shape"])
def test_bad_checkpoint_names_the_key(tmp_path, kind):
    sd = dict(tiny().state_dict())
    _mutations()[kind](sd)
    path = tmp_path / "bad.pt"
    save_official(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_vq(path, "VQ-tiny")
    message = str(err.value)
    assert ("attn.1.q.weight" if kind != "extra" else "attn.9.q.weight") in message
    assert {"missing": "missing", "extra": "unexpected", "shape": "wrong shape"}[kind] in message
    assert "VQ config" not in message  # same architecture as asked for: no config suggestion


def test_wrong_config_is_named(tmp_path):
    path = tmp_path / "vq_tiny.pt"
    save_official(tiny().state_dict(), path)
    with pytest.raises(CheckpointError, match="config_name='VQ-tiny'"):
        load_vq(path, "VQ-16")

    save_official({"tok_embeddings.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(CheckpointError, match="VQ tokenizer checkpoint"):
        load_vq(path, "VQ-tiny")

    with pytest.raises(ConfigError, match="VQ-16"):
        load_vq(path, "VQ-32")
