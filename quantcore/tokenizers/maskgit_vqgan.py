"""The MaskGIT VQGAN (`maskgit-vqgan-imagenet-f16-256.bin`), the tokenizer RAR generates tokens for.

A convolutional encoder maps an image in [0, 1] to a (h, w) grid of 256-dim vectors (16x smaller per
side), each snapped to its nearest entry (plain Euclidean distance, no normalisation) of a 1024-entry
codebook; a mirrored decoder maps codes back to pixels in [0, 1]. Unlike taming's VQGAN there is no
attention anywhere, no quant_conv / post_quant_conv, and the encoder downsamples with average pooling.

Parameter names equal the official checkpoint's keys (RAR `modeling/modules/maskgit_vqgan.py`):

    encoder.conv_in.weight                       (no bias)
    encoder.down.{level}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}.*   convs without bias
    encoder.mid.{j}.*, encoder.norm_out.*, encoder.conv_out.{weight,bias}
    decoder.conv_in.*, decoder.mid.{j}.*, decoder.up.{level}.block.{j}.*, decoder.up.{level}.upsample_conv.*
    decoder.norm_out.*, decoder.conv_out.*
    quantize.embedding.weight                    (1024, 256)

Only inference is here. Images are uint8 (B, H, W, 3) at the edges and floats in [0, 1] (B, 3, H, W)
inside.
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
from quantcore.tokenizers.common import check_channel_levels, check_divisible, float_images, token_grid


@dataclass(frozen=True)
class MaskGITConfig:
    codebook_size: int = 1024
    z_channels: int = 256  # also the code dimension: codes feed the decoder directly
    hidden_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2  # per level, encoder and decoder alike, and in each mid stack
    norm_groups: int = 32
    norm_eps: float = 1e-6
    image_channels: int = 3

    def __post_init__(self) -> None:
        check_channel_levels(
            "MaskGITConfig", "channel_mult", self.hidden_channels, self.channel_mult, self.norm_groups
        )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


MASKGIT_CONFIGS: dict[str, MaskGITConfig] = {
    "MaskGIT-VQGAN": MaskGITConfig(),
    # Every code path of the full model (shortcut convs both ways, pooling, upsampling), for unit tests.
    "MaskGIT-tiny": MaskGITConfig(
        codebook_size=64,
        z_channels=16,
        hidden_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        norm_groups=4,
    ),
}


def _norm(channels: int, cfg: MaskGITConfig) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps)


def _conv(in_ch: int, out_ch: int, kernel: int, bias: bool = True) -> nn.Conv2d:
    # The official "same" padding; for odd kernels at stride 1 it is the symmetric kernel // 2.
    return nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=bias)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, cfg: MaskGITConfig):
        super().__init__()
        self.norm1 = _norm(in_ch, cfg)
        self.conv1 = _conv(in_ch, out_ch, 3, bias=False)
        self.norm2 = _norm(out_ch, cfg)
        self.conv2 = _conv(out_ch, out_ch, 3, bias=False)
        # out -> out, not in -> out: the official block feeds the *branch output* through the shortcut
        # conv when the width changes (its input is then dropped). The weights were trained that way.
        self.nin_shortcut = _conv(out_ch, out_ch, 1, bias=False) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        residual = x if self.nin_shortcut is None else self.nin_shortcut(h)
        return h + residual


class DownsamplingBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, downsample: bool, cfg: MaskGITConfig):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_ch if j == 0 else out_ch, out_ch, cfg) for j in range(cfg.num_res_blocks)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for res in self.block:
            x = res(x)
        return F.avg_pool2d(x, kernel_size=2, stride=2) if self.downsample else x


class UpsamplingBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, upsample: bool, cfg: MaskGITConfig):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_ch if j == 0 else out_ch, out_ch, cfg) for j in range(cfg.num_res_blocks)
        )
        self.upsample_conv = _conv(out_ch, out_ch, 3) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for res in self.block:
            x = res(x)
        if self.upsample_conv is not None:
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


def _mid(channels: int, cfg: MaskGITConfig) -> nn.ModuleList:
    return nn.ModuleList(ResnetBlock(channels, channels, cfg) for _ in range(cfg.num_res_blocks))


class Encoder(nn.Module):
    def __init__(self, cfg: MaskGITConfig):
        super().__init__()
        widths = [cfg.hidden_channels * m for m in cfg.channel_mult]
        last = len(widths) - 1
        self.conv_in = _conv(cfg.image_channels, cfg.hidden_channels, 3, bias=False)
        self.down = nn.ModuleList(
            DownsamplingBlock(cfg.hidden_channels if i == 0 else widths[i - 1], w, i != last, cfg)
            for i, w in enumerate(widths)
        )
        self.mid = _mid(widths[-1], cfg)
        self.norm_out = _norm(widths[-1], cfg)
        self.conv_out = _conv(widths[-1], cfg.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in (*self.down, *self.mid):
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: MaskGITConfig):
        super().__init__()
        widths = [cfg.hidden_channels * m for m in cfg.channel_mult]
        last = len(widths) - 1
        self.conv_in = _conv(cfg.z_channels, widths[-1], 3)
        self.mid = _mid(widths[-1], cfg)
        # up.{i} is level i (up.0 the full resolution) and runs from the last level back to the first;
        # every level but the first doubles the resolution on its way out.
        self.up = nn.ModuleList(
            UpsamplingBlock(widths[min(i + 1, last)], w, i != 0, cfg) for i, w in enumerate(widths)
        )
        self.norm_out = _norm(widths[0], cfg)
        self.conv_out = _conv(widths[0], cfg.image_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in (*self.mid, *reversed(self.up)):
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    CHUNK = 4096  # vectors per distance matrix, so a big batch never builds one huge matrix

    def __init__(self, cfg: MaskGITConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.z_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) latents -> (B, h*w) code ids in raster order (nearest code, squared L2)."""
        b, d, hgt, wid = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        codes = self.embedding.weight
        code_sq = (codes**2).sum(1)
        # |z|^2 + |e|^2 - 2 z.e written out as in the official code, so near-ties resolve the same way
        ids = torch.cat(
            [
                ((part**2).sum(1, keepdim=True) + code_sq - 2 * part @ codes.T).argmin(1)
                for part in flat.split(self.CHUNK)
            ]
        )
        return ids.view(b, hgt * wid)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, h, w) code ids -> (B, D, h, w) code vectors."""
        return self.embedding(ids).permute(0, 3, 1, 2).contiguous()


class MaskGITVQGAN(nn.Module):
    def __init__(self, config: MaskGITConfig):
        super().__init__()
        self.config = config
        self.downsample_factor = config.downsample_factor
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)

    @torch.no_grad()
    def encode_to_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) or float (B, 3, H, W) in [0, 1] -> LongTensor (B, h*w) in raster order."""
        images = float_images(
            images, self.config.image_channels, self.encoder.conv_in.weight, unit_range=True
        )
        check_divisible(images, self.downsample_factor)
        return self.quantize(self.encoder(images))

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """LongTensor (B, h*w) in raster order -> uint8 (B, H, W, 3). `grid` defaults to a square."""
        grid = token_grid(tokens, grid, self.config.codebook_size)
        ids = tokens.to(self.encoder.conv_in.weight.device).view(tokens.shape[0], *grid)
        images = self.decoder(self.quantize.lookup(ids))
        # The official conversion: clamp to [0, 1], times 255, truncated to uint8.
        return (images.clamp(0.0, 1.0) * 255.0).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _config_signature(cfg: MaskGITConfig) -> tuple:
    return (
        (cfg.codebook_size, cfg.z_channels),
        cfg.hidden_channels,
        tuple(cfg.channel_mult),
        cfg.num_res_blocks,
    )


def _file_signature(sd: Mapping[str, torch.Tensor]) -> tuple | None:
    """The architecture read off a state dict's shapes, in `_config_signature`'s layout, or None where
    the keys it needs are absent."""
    if "quantize.embedding.weight" not in sd or "encoder.conv_in.weight" not in sd:
        return None
    emb, hidden = sd["quantize.embedding.weight"], sd["encoder.conv_in.weight"].shape[0]
    widths = []
    while (key := f"encoder.down.{len(widths)}.block.0.conv1.weight") in sd:
        widths.append(sd[key].shape[0])
    n_res = 0
    while f"encoder.down.0.block.{n_res}.conv1.weight" in sd:
        n_res += 1
    if emb.ndim != 2 or not widths or hidden == 0 or any(w % hidden for w in widths):
        return None
    return (tuple(emb.shape), hidden, tuple(w // hidden for w in widths), n_res)


def _suggest(config_name: str) -> Callable[[Mapping[str, torch.Tensor]], str | None]:
    def suggest(sd: Mapping[str, torch.Tensor]) -> str | None:
        found = _file_signature(sd)
        if found is None:
            return (
                "It lacks the MaskGIT VQGAN keys that tell the architecture; is it a MaskGIT tokenizer file?"
            )
        for name, cfg in MASKGIT_CONFIGS.items():
            if _config_signature(cfg) == found:
                return (
                    None
                    if name == config_name
                    else f"Its shapes fit MaskGIT config {name!r}; pass config_name={name!r}"
                )
        (codebook_size, dim), hidden, mult, n_res = found
        return (
            f"Its shapes (codebook {codebook_size}x{dim}, hidden {hidden}, channel_mult {mult}, {n_res} res "
            f"blocks) fit none of the MaskGIT configs {sorted(MASKGIT_CONFIGS)}"
        )

    return suggest


def load_maskgit(
    path: str | Path, config_name: str = "MaskGIT-VQGAN", device: str | torch.device = "cpu"
) -> MaskGITVQGAN:
    """Build the named MaskGIT VQGAN and strictly load `path` (the official file is a plain state dict)."""
    if config_name not in MASKGIT_CONFIGS:
        raise ConfigError(f"unknown MaskGIT config {config_name!r}; known: {', '.join(MASKGIT_CONFIGS)}")
    model = MaskGITVQGAN(MASKGIT_CONFIGS[config_name])
    load_checkpoint(model, path, suggest=_suggest(config_name))
    return model.to(device).eval()
