"""LlamaGen's VQ image tokenizer (VQ-16: `vq_ds16_c2i.pt`), the one LlamaGen and PAR generate tokens for.

A convolutional encoder maps an image to a (h, w) grid of 8-dim vectors (16x smaller per side), each is
snapped to its nearest entry of a 16384-entry codebook, and a mirrored decoder maps codes back to pixels.
Codes and encoder outputs are both l2-normalised before the lookup, so the lookup is a cosine match.

Only inference is here: no losses, no discriminator, no codebook-usage bookkeeping (the usage buffer is
still registered, because the official checkpoint stores it and loading is strict). Parameter names
equal the official checkpoint's keys. Images are uint8 (B, H, W, 3) at the edges and floats in [-1, 1]
(B, 3, H, W) inside.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from quantcore.checkpoint import load_checkpoint
from quantcore.errors import ConfigError
from quantcore.tokenizers.common import (
    ResnetBlock,
    check_channel_levels,
    check_divisible,
    float_images,
    token_grid,
)


@dataclass(frozen=True)
class VQConfig:
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # encoder and decoder use the same multipliers
    z_channels: int = 256
    num_res_blocks: int = 2  # per encoder level; the decoder has one more per level
    norm_groups: int = 32
    norm_eps: float = 1e-6
    image_channels: int = 3
    # The official quantizer keeps a rolling window of recent code ids for its training logs; the
    # window length is a fixed 65536, independent of the codebook size.
    usage_window: int = 65536

    def __post_init__(self) -> None:
        check_channel_levels("VQConfig", "ch_mult", self.ch, self.ch_mult, self.norm_groups)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


VQ_CONFIGS: dict[str, VQConfig] = {
    "VQ-16": VQConfig(),
    # LlamaGen's other class-conditional tokenizer (vq_ds8_c2i.pt); here so a wrong file gets named.
    "VQ-8": VQConfig(ch_mult=(1, 2, 2, 4)),
    # Same code paths as VQ-16 (attention, resampling, shortcut convs, mid), small enough for unit tests.
    "VQ-tiny": VQConfig(
        codebook_size=64,
        ch=16,
        ch_mult=(1, 2),
        z_channels=16,
        num_res_blocks=1,
        norm_groups=4,
        usage_window=64,
    ),
}


def _norm(channels: int, cfg: VQConfig) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 convs as the projections."""

    def __init__(self, channels: int, cfg: VQConfig):
        super().__init__()
        self.norm = _norm(channels, cfg)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head, pixels as the sequence. The tokenizer is never
        # quantized, so the fused kernel is fine here (scale 1/sqrt(C), as in the official code).
        q, k, v = (proj(h).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.squeeze(1).transpose(1, 2).reshape(b, c, hgt, wid)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pad right and bottom only (as the official model does), so the stride-2 conv halves H and W.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ConvBlock(nn.Module):
    """One resolution level: res blocks (each followed by attention where `attn` is set), then resampling."""

    def __init__(self, in_ch: int, out_ch: int, n_res: int, attn: bool, resample: str | None, cfg: VQConfig):
        super().__init__()
        self.res = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, cfg.norm_groups, cfg.norm_eps)
            for i in range(n_res)
        )
        self.attn = nn.ModuleList(AttnBlock(out_ch, cfg) for _ in range(n_res) if attn)
        # The official keys name the resampler after its direction.
        self.downsample = Downsample(out_ch) if resample == "down" else None
        self.upsample = Upsample(out_ch) if resample == "up" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, res in enumerate(self.res):
            x = res(x)
            if self.attn:
                x = self.attn[i](x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


def _mid(channels: int, cfg: VQConfig) -> nn.ModuleList:
    return nn.ModuleList(
        [
            ResnetBlock(channels, channels, cfg.norm_groups, cfg.norm_eps),
            AttnBlock(channels, cfg),
            ResnetBlock(channels, channels, cfg.norm_groups, cfg.norm_eps),
        ]
    )


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.image_channels, cfg.ch, 3, padding=1)
        # Attention only at the lowest resolution, where the sequence is short; every level but the
        # lowest halves the resolution on its way out.
        self.conv_blocks = nn.ModuleList(
            ConvBlock(
                cfg.ch if i == 0 else widths[i - 1],
                widths[i],
                cfg.num_res_blocks,
                attn=i == last,
                resample=None if i == last else "down",
                cfg=cfg,
            )
            for i in range(len(widths))
        )
        self.mid = _mid(widths[-1], cfg)
        self.norm_out = _norm(widths[-1], cfg)
        self.conv_out = nn.Conv2d(widths[-1], cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.conv_blocks:
            h = block(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        # conv_blocks.0 is the lowest resolution: the decoder walks the encoder's levels backwards.
        widths = [cfg.ch * m for m in reversed(cfg.ch_mult)]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[0], 3, padding=1)
        self.mid = _mid(widths[0], cfg)
        self.conv_blocks = nn.ModuleList(
            ConvBlock(
                widths[max(i - 1, 0)],
                widths[i],
                cfg.num_res_blocks + 1,
                attn=i == 0,
                resample=None if i == last else "up",
                cfg=cfg,
            )
            for i in range(len(widths))
        )
        self.norm_out = _norm(widths[-1], cfg)
        self.conv_out = nn.Conv2d(widths[-1], cfg.image_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for block in self.conv_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    CHUNK = 4096  # vectors per distance matrix, so a big batch never builds a (N, 16384) matrix at once

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)
        # Training-time statistics in the official model; kept only because the checkpoint has it.
        self.register_buffer("codebook_used", torch.zeros(cfg.usage_window))

    def codebook(self) -> torch.Tensor:
        """The (codebook_size, embed_dim) code vectors as they are used: unit-norm."""
        return F.normalize(self.embedding.weight, dim=-1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D, h, w) latents -> (unit-norm codes of the same shape, (B, h*w) code ids in raster order)."""
        b, d, hgt, wid = z.shape
        flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, d), dim=-1)
        codes = self.codebook()
        # Squared distance written out as the official code does (|z|^2 + |e|^2 - 2 z.e, not just the dot
        # product): the norms are 1 only up to rounding, and this keeps near-ties resolving the same way.
        code_sq = (codes**2).sum(1)
        ids = torch.cat(
            [
                ((part**2).sum(1, keepdim=True) + code_sq - 2 * part @ codes.T).argmin(1)
                for part in flat.split(self.CHUNK)
            ]
        )
        return self.lookup(ids.view(b, hgt, wid)), ids.view(b, hgt * wid)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, h, w) code ids -> (B, D, h, w) unit-norm code vectors."""
        return self.codebook()[ids].permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.downsample_factor = config.downsample_factor
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) floats in [-1, 1] -> (quantized codes (B, D, h, w), ids (B, h*w))."""
        return self.quantize(self.quant_conv(self.encoder(images)))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) code vectors -> (B, 3, H, W) floats, nominally in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(codes))

    @torch.no_grad()
    def encode_to_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) or float (B, 3, H, W) in [-1, 1] -> LongTensor (B, h*w) in raster order."""
        # The official preprocessing: ToTensor (/255) then Normalize(0.5, 0.5).
        images = float_images(images, self.config.image_channels, self.quant_conv.weight, unit_range=False)
        check_divisible(images, self.downsample_factor)
        return self.encode(images)[1]

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """LongTensor (B, h*w) in raster order -> uint8 (B, H, W, 3). `grid` defaults to a square."""
        grid = token_grid(tokens, grid, self.config.codebook_size)
        ids = tokens.to(self.quant_conv.weight.device).view(tokens.shape[0], *grid)
        images = self.decode_codes(self.quantize.lookup(ids))
        # The official sampling scripts' conversion: 127.5 * x + 128 truncated is round-half-up of
        # (x + 1) * 127.5, and clamping to [0, 255] is clamping x to [-1, 1].
        return (127.5 * images + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _config_signature(cfg: VQConfig) -> tuple:
    codebook = (cfg.codebook_size, cfg.codebook_embed_dim)
    return (codebook, cfg.ch, tuple(cfg.ch_mult), cfg.z_channels, cfg.num_res_blocks)


def _file_signature(sd: Mapping[str, torch.Tensor]) -> tuple | None:
    """Read the architecture off a state dict's shapes, in `_config_signature`'s layout, or None where
    the VQ keys it needs are absent."""
    names = ("quantize.embedding.weight", "encoder.conv_in.weight", "encoder.conv_out.weight")
    if any(name not in sd for name in names):
        return None
    emb, conv_in, conv_out = (sd[name] for name in names)
    ch = conv_in.shape[0]
    widths = []
    while (key := f"encoder.conv_blocks.{len(widths)}.res.0.conv1.weight") in sd:
        widths.append(sd[key].shape[0])
    n_res = 0
    while f"encoder.conv_blocks.0.res.{n_res}.conv1.weight" in sd:
        n_res += 1
    if emb.ndim != 2 or not widths or ch == 0 or any(w % ch for w in widths):
        return None
    return (tuple(emb.shape), ch, tuple(w // ch for w in widths), conv_out.shape[0], n_res)


def _suggest(config_name: str) -> Callable[[Mapping[str, torch.Tensor]], str | None]:
    def suggest(sd: Mapping[str, torch.Tensor]) -> str | None:
        found = _file_signature(sd)
        if found is None:
            return "It lacks the VQ keys that tell the architecture; is it a VQ tokenizer checkpoint?"
        for name, cfg in VQ_CONFIGS.items():
            if _config_signature(cfg) == found:
                # Same architecture as asked for: the listed keys are the whole story.
                return (
                    None
                    if name == config_name
                    else f"Its shapes fit VQ config {name!r}; pass config_name={name!r}"
                )
        (codebook_size, dim), ch, ch_mult, z, n_res = found
        return (
            f"Its shapes (codebook {codebook_size}x{dim}, ch {ch}, ch_mult {ch_mult}, z_channels {z}, "
            f"{n_res} res blocks) fit none of the VQ configs {sorted(VQ_CONFIGS)}"
        )

    return suggest


def load_vq(path: str | Path, config_name: str = "VQ-16", device: str | torch.device = "cpu") -> VQModel:
    """Build the named VQ tokenizer, strictly load `path` (the official file keeps weights under "model")."""
    if config_name not in VQ_CONFIGS:
        raise ConfigError(f"unknown VQ config {config_name!r}; known: {', '.join(VQ_CONFIGS)}")
    model = VQModel(VQ_CONFIGS[config_name])
    load_checkpoint(model, path, suggest=_suggest(config_name))
    return model.to(device).eval()
