"""The KL-16 VAE (`kl16.ckpt`) MAR generates latents for: LDM's AutoencoderKL with embed_dim 16.

A convolutional encoder maps an image in [-1, 1] to the mean and log-variance of a diagonal Gaussian on
a (16, h, w) grid, 16x smaller per side (ch 128, ch_mult (1, 1, 2, 2, 4), 2 res blocks per level,
attention at the 16x16 level and in the middle); the decoder (one more res block per level, attention in
the middle only) maps latents back to pixels in [-1, 1]. No codebook: tokens are continuous.

Parameter names equal the official checkpoint's keys (MAR `models/vae.py`, weights under "model"):

    encoder.conv_in, encoder.down.{level}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}
    encoder.down.{level}.attn.{j}.{norm,q,k,v,proj_out}, encoder.down.{level}.downsample.conv
    encoder.mid.{block_1,attn_1,block_2}, encoder.norm_out, encoder.conv_out (2 x embed_dim outputs)
    decoder.conv_in, decoder.mid.*, decoder.up.{level}.block.{j}.*, decoder.up.{level}.upsample.conv,
    decoder.norm_out, decoder.conv_out, quant_conv (2e -> 2e), post_quant_conv (e -> e)

Only inference is here: `encode` gives the posterior mean (the mode) and log-variance, `encode_latents`
the mean or a seeded sample, `decode_latents` uint8 images as the official scripts write them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from quantcore.checkpoint import load_checkpoint
from quantcore.errors import ConfigError
from quantcore.tokenizers.common import Level, Mid, check_channel_levels, check_divisible, float_images

# LDM attention has LlamaGen VQ's keys (norm, q, k, v, proj_out): one block for both
from quantcore.tokenizers.vq16 import AttnBlock


@dataclass(frozen=True)
class KLConfig:
    embed_dim: int = 16
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    resolution: int = 256  # sets which level has attention (attn_resolutions below, in pixels)
    attn_resolutions: tuple[int, ...] = (16,)  # the encoder's only; the official decoder has none
    norm_groups: int = 32
    norm_eps: float = 1e-6
    image_channels: int = 3

    def __post_init__(self) -> None:
        check_channel_levels("KLConfig", "ch_mult", self.ch, self.ch_mult, self.norm_groups)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


KL_CONFIGS: dict[str, KLConfig] = {
    "KL-16": KLConfig(),
    # Every code path of the full model (shortcut convs, attention levels, resampling), for unit tests.
    "KL-tiny": KLConfig(embed_dim=4, ch=16, ch_mult=(1, 2), num_res_blocks=1, resolution=8,
                        attn_resolutions=(4,), norm_groups=4),
}  # fmt: skip


def _norm(channels: int, cfg: KLConfig) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps)


class Encoder(nn.Module):
    def __init__(self, cfg: KLConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.image_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList(
            Level(
                cfg.ch if i == 0 else widths[i - 1],
                w,
                cfg.num_res_blocks,
                cfg.resolution // 2**i in cfg.attn_resolutions,
                "down" if i != last else None,
                cfg,
                AttnBlock,
            )
            for i, w in enumerate(widths)
        )
        self.mid = Mid(widths[-1], cfg, AttnBlock)
        self.norm_out = _norm(widths[-1], cfg)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.embed_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: KLConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.embed_dim, widths[-1], 3, padding=1)
        self.mid = Mid(widths[-1], cfg, AttnBlock)
        # up.{i} is level i (up.0 the full resolution); they run from the last level back to the first
        self.up = nn.ModuleList(
            Level(
                widths[min(i + 1, last)],
                w,
                cfg.num_res_blocks + 1,
                False,
                "up" if i != 0 else None,
                cfg,
                AttnBlock,
            )
            for i, w in enumerate(widths)
        )
        self.norm_out = _norm(widths[0], cfg)
        self.conv_out = nn.Conv2d(widths[0], cfg.image_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, config: KLConfig):
        super().__init__()
        self.config = config
        self.downsample_factor = config.downsample_factor
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.embed_dim, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.embed_dim, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, H, W, 3) or float (B, 3, H, W) in [-1, 1] -> the posterior's mean and log-variance
        (B, embed_dim, h, w); the log-variance clamped to [-30, 20] as the official."""
        images = float_images(
            images, self.config.image_channels, self.encoder.conv_in.weight, unit_range=False
        )
        check_divisible(images, self.downsample_factor)
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The posterior's mean, or a sample from it drawn with `generator` (MAR trains on samples)."""
        mean, logvar = self.encode(images)
        if generator is None:
            return mean
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return mean + (0.5 * logvar).exp() * noise

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Float latents (B, embed_dim, h, w) -> uint8 (B, H, W, 3): (x + 1) / 2, times 255, rounded."""
        if latents.ndim != 4 or latents.shape[1] != self.config.embed_dim:
            raise ConfigError(
                f"latents must be (B, {self.config.embed_dim}, h, w), got shape {tuple(latents.shape)}"
            )
        weight = self.post_quant_conv.weight
        images = self.decoder(self.post_quant_conv(latents.to(weight.device, weight.dtype)))
        pixels = ((images.float() + 1.0) / 2.0 * 255.0).round().clamp(0, 255)
        return pixels.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _suggest(config_name: str):
    def suggest(sd) -> str | None:
        key = "encoder.conv_out.weight"
        if key not in sd:
            return "It lacks the AutoencoderKL keys; is it a KL-16 VAE file (MAR's kl16.ckpt)?"
        embed = sd[key].shape[0] // 2
        fits = [n for n, c in KL_CONFIGS.items() if c.embed_dim == embed and n != config_name]
        return f"Its latent width {embed} fits {fits}" if fits else f"Its latent width is {embed}"

    return suggest


def load_kl(
    path: str | Path, config_name: str = "KL-16", device: str | torch.device = "cpu"
) -> AutoencoderKL:
    """Build the named VAE and strictly load `path` (the official file holds its weights under "model")."""
    if config_name not in KL_CONFIGS:
        raise ConfigError(f"unknown KL config {config_name!r}; known: {', '.join(KL_CONFIGS)}")
    model = AutoencoderKL(KL_CONFIGS[config_name])
    load_checkpoint(model, path, suggest=_suggest(config_name))
    return model.to(device).eval()
