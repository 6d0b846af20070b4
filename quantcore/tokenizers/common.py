"""Pieces the image tokenizers share: input checks and the taming-style residual block."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from quantcore.errors import ConfigError


def check_channel_levels(
    config: str, field: str, base: int, mults: tuple[int, ...], norm_groups: int
) -> None:
    """The multipliers `field` need a level, and every width (base * mult) must split into GroupNorm groups."""
    if not mults:
        raise ConfigError(f"{config}.{field} must have at least one level")
    bad = sorted(c for c in {base * m for m in mults} | {base} if c % norm_groups)
    if bad:
        raise ConfigError(f"{config}.norm_groups={norm_groups} does not divide channel widths {bad}")


def float_images(images: torch.Tensor, channels: int, like: torch.Tensor, unit_range: bool) -> torch.Tensor:
    """uint8 (B, H, W, C) or float (B, C, H, W) -> float (B, C, H, W) on `like`'s device and dtype.

    uint8 maps to [0, 1] (unit_range, MaskGIT) or to [-1, 1] (ToTensor + Normalize(0.5, 0.5): LlamaGen, VAR).
    """
    span = "[0, 1]" if unit_range else "[-1, 1]"
    if images.dtype == torch.uint8:
        if images.ndim != 4 or images.shape[-1] != channels:
            raise ConfigError(f"uint8 images must be (B, H, W, {channels}), got shape {tuple(images.shape)}")
        images = images.permute(0, 3, 1, 2).to(like.device, like.dtype)
        return images / 255.0 if unit_range else images / 127.5 - 1.0
    if images.ndim != 4 or images.shape[1] != channels:
        raise ConfigError(
            f"float images must be (B, {channels}, H, W) in {span}, got shape {tuple(images.shape)}"
        )
    return images.to(like.device, like.dtype)


def check_divisible(images: torch.Tensor, factor: int) -> None:
    if images.shape[2] % factor or images.shape[3] % factor:
        raise ConfigError(
            f"image size {tuple(images.shape[2:])} is not a multiple of the downsample factor {factor}"
        )


def token_grid(tokens: torch.Tensor, grid: tuple[int, int] | None, codebook_size: int) -> tuple[int, int]:
    """The (h, w) grid of raster-order tokens (B, h*w), after checking shape and id range."""
    n = tokens.shape[1]
    if grid is None:
        side = round(n**0.5)
        if side * side != n:
            raise ConfigError(f"{n} tokens per image is not a square grid; pass grid=(h, w)")
        grid = (side, side)
    if grid[0] * grid[1] != n:
        raise ConfigError(f"grid {tuple(grid)} does not hold {n} tokens per image")
    if n and (int(tokens.min()) < 0 or int(tokens.max()) >= codebook_size):
        raise ConfigError(
            f"token ids must lie in [0, {codebook_size}), got [{int(tokens.min())}, {int(tokens.max())}]"
        )
    return grid


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice plus a residual; official key names (norm1, conv1, norm2, conv2,
    nin_shortcut) of the LlamaGen and VAR VQ models."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # A 1x1 conv puts the residual in the new width when the block changes it (no keys otherwise).
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class Downsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # right/bottom padding only, as the official models


class Upsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level of the taming/LDM autoencoders (VAR's VQVAE, MAR's KL-16): `block` res
    blocks, `attn` after each where the level has attention, then a resampler. The official code builds
    these as bare nn.Module()s; the attribute names are its keys. `attention(channels, cfg)` builds the
    family's attention block (their keys differ: fused qkv or separate q, k, v)."""

    def __init__(self, in_ch: int, out_ch: int, n_res: int, attn: bool, resample: str | None, cfg, attention):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, cfg.norm_groups, 1e-6) for i in range(n_res)
        )
        self.attn = nn.ModuleList(attention(out_ch, cfg) for _ in range(n_res) if attn)
        if resample == "down":
            self.downsample = Downsample2x(out_ch)
        elif resample == "up":
            self.upsample = Upsample2x(out_ch)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        if hasattr(self, "downsample"):
            h = self.downsample(h)
        if hasattr(self, "upsample"):
            h = self.upsample(h)
        return h


class Mid(nn.Module):
    """res block, attention, res block at the lowest resolution (official keys block_1, attn_1, block_2)."""

    def __init__(self, channels: int, cfg, attention):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, cfg.norm_groups, 1e-6)
        self.attn_1 = attention(channels, cfg)
        self.block_2 = ResnetBlock(channels, channels, cfg.norm_groups, 1e-6)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))
