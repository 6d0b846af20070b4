"""VAR's multi-scale VQ-VAE (`vae_ch160v4096z32.pth`): images <-> a pyramid of token maps.

The encoder maps a 256x256 image to a 16x16 grid of 32-dim vectors f. Residual quantization then
walks the scales (1, 2, 3, 4, 5, 6, 8, 10, 13, 16): at scale k the residual f - f_hat is
area-downsampled to k x k, each vector snaps to its nearest codebook entry (plain L2, no l2-norm),
the code map is bicubically upsampled back to 16x16, passed through a "Phi" conv
(phi(h) = 0.5 h + 0.5 conv3x3(h)) and added into f_hat. The 10 token maps together are the
1+4+...+256 = 680 tokens VAR generates, scale by scale (raster order within a scale). f_hat decodes to
pixels with a mirrored conv decoder.

Phi is partially shared: 4 convs serve the 10 scales, scale k using the conv whose tick in
linspace(1/12, 11/12, 4) is nearest to k/9. Scales 2 and 7 sit exactly half-way between two ticks;
float64 rounding sends them to convs 1 and 3 in the official numpy code, and `phi_index` computes it
the same way (scales -> convs 0 0 1 1 1 2 2 3 3 3).

VAR itself needs the quantizer at run time (`VectorQuantizer2.next_autoregressive_input` during
sampling and `tokens_to_var_input` for the teacher-forced pass): see `quantcore.models.var`.

Parameter names equal the official checkpoint's keys, so `load_var_vqvae` loads strictly. Only
inference is here (no losses); the training-time `quantize.ema_vocab_hit_SV` buffer is registered
because the official file stores it. Images are uint8 (B, H, W, 3) at the edges and floats in
[-1, 1] (B, 3, H, W) inside.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from quantcore.checkpoint import check_state_dict, read_state_dict
from quantcore.errors import ConfigError
from quantcore.tokenizers.common import Level, Mid, check_channel_levels

OFFICIAL_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


@dataclass(frozen=True)
class VARVQConfig:
    vocab_size: int = 4096  # V
    cvae: int = 32  # codebook / latent channels (Cvae, also the encoder's z_channels)
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2  # per encoder level; the decoder has one more per level
    norm_groups: int = 32
    quant_conv_ks: int = 3
    quant_resi: float = 0.5  # phi(h) = (1 - r) h + r conv(h)
    share_quant_resi: int = 4  # number of partially shared phi convs
    patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS
    image_channels: int = 3

    def __post_init__(self) -> None:
        if len(self.patch_nums) < 2 or list(self.patch_nums) != sorted(set(self.patch_nums)):
            raise ConfigError(f"patch_nums must be >= 2 strictly increasing sizes, got {self.patch_nums}")
        if self.share_quant_resi < 2:
            raise ConfigError(
                f"share_quant_resi={self.share_quant_resi}: only partially shared phi (>= 2 convs, the "
                "official setting) is implemented"
            )
        if abs(self.quant_resi) <= 1e-6:
            raise ConfigError("quant_resi must be non-zero (the official phi convs are always present)")
        check_channel_levels("VARVQConfig", "ch_mult", self.ch, self.ch_mult, self.norm_groups)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.patch_nums[-1]

    @property
    def image_size(self) -> int:
        return self.grid_size * self.downsample_factor

    @property
    def num_tokens(self) -> int:
        return sum(p * p for p in self.patch_nums)

    def to_dict(self) -> dict:
        return asdict(self)


VAR_VQ_CONFIGS: dict[str, VARVQConfig] = {
    "VAR-VQVAE": VARVQConfig(),  # vae_ch160v4096z32.pth
    # Every code path of the full tokenizer (shortcut convs, attention, resampling, 4 shared phi convs
    # with the tie-breaking ticks, bicubic and area resampling between scales) in milliseconds.
    "VAR-VQVAE-tiny": VARVQConfig(
        vocab_size=64, cvae=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4, patch_nums=(1, 2, 3, 4)
    ),
}


def bicubic_upsample(h: torch.Tensor, size: int) -> torch.Tensor:
    """F.interpolate(h, size=(size, size), mode="bicubic") for square maps h (B, C, n, n). On CUDA as the
    separable sum with the (size, n) interpolation matrix W, W h W^T, as broadcast products and sums (fp32
    whatever the TF32 settings): PyTorch's CUDA kernel runs one thread per output pixel looping over B x C,
    1.5 ms per call at VAR-d16 batch 64 (64 x 32 maps to 16 x 16), 10% of a W8A8 generation (H100 profile,
    2026-12-07). The sums then differ from the kernel's by fp32 rounding (bf16 maps: one rounding of the
    fp32 result, as the kernel); on the CPU it stays the official call."""
    if h.device.type != "cuda":
        return F.interpolate(h, size=(size, size), mode="bicubic")
    return separable_bicubic(h, size)


def separable_bicubic(h: torch.Tensor, size: int) -> torch.Tensor:
    """W h W^T on any device, accumulated in fp32 (or h's wider dtype) and rounded once to h's dtype."""
    acc = torch.promote_types(h.dtype, torch.float32)  # the kernel accumulates bf16 maps in fp32 too
    w = _bicubic_matrix(h.shape[-1], size, h.device, acc)
    rows = (w[:, :, None] * h.to(acc).unsqueeze(-3)).sum(-2)  # (B, C, size, n)
    return (rows.unsqueeze(-2) * w).sum(-1).to(h.dtype)


_BICUBIC: dict[tuple, torch.Tensor] = {}


def _bicubic_matrix(n: int, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(size, n) weights of 1-D bicubic resizing, read off F.interpolate's response to each unit vector
    (float64, on the CPU); built outside CUDA-graph capture (the samplers warm up first) and kept."""
    key = (n, size, str(device), dtype)
    if key not in _BICUBIC:
        unit = torch.eye(n, dtype=torch.float64).reshape(n, 1, 1, n)
        response = F.interpolate(unit, size=(1, size), mode="bicubic")  # height 1 -> 1 keeps the weight 1
        _BICUBIC[key] = response.reshape(n, size).T.contiguous().to(device, dtype)
    return _BICUBIC[key]


def phi_index(share_quant_resi: int, num_scales: int) -> list[int]:
    """Which shared phi conv each scale uses: the official `PhiPartiallyShared.__getitem__`, in numpy
    float64 so that exact ties (scale k/9 half-way between two ticks) resolve the same way."""
    k = share_quant_resi
    ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)
    return [int(np.argmin(np.abs(ticks - si / (num_scales - 1)))) for si in range(num_scales)]


def _norm(channels: int, cfg: VARVQConfig) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; one fused 1x1 qkv conv, softmax scale C^-1/2."""

    def __init__(self, channels: int, cfg: VARVQConfig):
        super().__init__()
        self.norm = _norm(channels, cfg)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, hgt * wid).unbind(1)
        # (B, C, HW) -> (B, 1, HW, C): one head, pixels as the sequence; the tokenizer is never quantized
        q, k, v = (t.transpose(1, 2).unsqueeze(1) for t in (q, k, v))
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2)
        return x + self.proj_out(h.reshape(b, c, hgt, wid))


class Encoder(nn.Module):
    def __init__(self, cfg: VARVQConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        ins = [cfg.ch, *widths[:-1]]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.image_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList(
            Level(
                ins[i],
                widths[i],
                cfg.num_res_blocks,
                i == last,
                None if i == last else "down",
                cfg,
                AttnBlock,
            )
            for i in range(len(widths))
        )
        self.mid = Mid(widths[-1], cfg, AttnBlock)
        self.norm_out = _norm(widths[-1], cfg)
        self.conv_out = nn.Conv2d(widths[-1], cfg.cvae, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VARVQConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.cvae, widths[-1], 3, padding=1)
        self.mid = Mid(widths[-1], cfg, AttnBlock)
        # up[i] is level i (0 = full resolution); the decoder runs them from the lowest resolution up
        ins = [widths[i + 1] if i < last else widths[-1] for i in range(len(widths))]
        self.up = nn.ModuleList(
            Level(
                ins[i], widths[i], cfg.num_res_blocks + 1, i == last, None if i == 0 else "up", cfg, AttnBlock
            )
            for i in range(len(widths))
        )
        self.norm_out = _norm(widths[0], cfg)
        self.conv_out = nn.Conv2d(widths[0], cfg.image_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    def __init__(self, channels: int, quant_resi: float):
        super().__init__(channels, channels, 3, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.resi_ratio) + super().forward(h).mul(self.resi_ratio)


class PhiPartiallyShared(nn.Module):
    def __init__(self, cfg: VARVQConfig):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(cfg.cvae, cfg.quant_resi) for _ in range(cfg.share_quant_resi))


class VectorQuantizer2(nn.Module):
    """The multi-scale residual quantizer and the f_hat arithmetic VAR's sampler and teacher forcing use.

    Token tensors are (B, L) with L = sum(pn^2): the scales one after another, raster order inside.
    """

    CHUNK = 4096  # vectors per distance matrix while encoding

    def __init__(self, cfg: VARVQConfig):
        super().__init__()
        self.config = cfg
        self.patch_nums = tuple(cfg.patch_nums)
        self.quant_resi = PhiPartiallyShared(cfg)
        # training-time code-usage statistics; kept only because the official checkpoint has them
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), cfg.vocab_size))
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.cvae)
        self.phi_of_scale = phi_index(cfg.share_quant_resi, len(self.patch_nums))
        bounds, start = [], 0
        for pn in self.patch_nums:
            bounds.append((start, start + pn * pn))
            start += pn * pn
        self.scale_bounds = tuple(bounds)

    def phi(self, si: int) -> Phi:
        return self.quant_resi.qresi_ls[self.phi_of_scale[si]]

    @property
    def grid(self) -> int:
        return self.patch_nums[-1]

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        ends = {end for _, end in self.scale_bounds}
        if tokens.dim() != 2 or tokens.shape[1] not in ends | {0}:
            raise ConfigError(
                f"tokens must be (B, n) with n a whole number of scales {sorted(ends)}, got {tuple(tokens.shape)}"
            )
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise ConfigError(
                f"token ids must lie in [0, {self.config.vocab_size}), got "
                f"[{int(tokens.min())}, {int(tokens.max())}]"
            )

    def code_map(self, tokens: torch.Tensor, si: int) -> torch.Tensor:
        """(B, Cvae, pn, pn) code vectors of scale si from full or partial tokens (B, >= end of si)."""
        start, end = self.scale_bounds[si]
        pn = self.patch_nums[si]
        h = self.embedding(tokens[:, start:end].to(self.embedding.weight.device))
        return h.transpose(1, 2).reshape(tokens.shape[0], self.config.cvae, pn, pn)

    def _upsampled(self, h: torch.Tensor, si: int) -> torch.Tensor:
        """phi(bicubic(h) to the full grid); the last scale is already full size."""
        if si != len(self.patch_nums) - 1:
            h = bicubic_upsample(h, self.grid)
        return self.phi(si)(h)

    def next_autoregressive_input(
        self, si: int, f_hat: torch.Tensor, h: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Official `get_next_autoregressive_input`: add scale si's codes h (B, Cvae, pn, pn) into f_hat
        (in place) and return (f_hat, f_hat area-downsampled to scale si + 1, or f_hat after the last)."""
        f_hat.add_(self._upsampled(h, si))
        if si == len(self.patch_nums) - 1:
            return f_hat, f_hat
        nxt = self.patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(nxt, nxt), mode="area")

    def tokens_to_var_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """VAR's teacher-forcing input (official `idxBl_to_var_input`) from the tokens of the first k scales.

        Returns (B, n, Cvae): the inputs of scales 1..min(k, S-1), i.e. f_hat after scales < j
        area-downsampled to scale j, flattened in raster order. With all S scales the last one is not
        needed (n = L - first scale), so full sequences and decoding prefixes both work.
        """
        self._check_tokens(tokens)
        b = tokens.shape[0]
        done = sum(1 for _, end in self.scale_bounds if end <= tokens.shape[1])
        f_hat = self.embedding.weight.new_zeros(b, self.config.cvae, self.grid, self.grid)
        parts = []
        for si in range(min(done, len(self.patch_nums) - 1)):
            _, nxt = self.next_autoregressive_input(si, f_hat, self.code_map(tokens, si))
            parts.append(nxt.flatten(2).transpose(1, 2))
        if not parts:
            return f_hat.new_zeros(b, 0, self.config.cvae)
        return torch.cat(parts, dim=1)

    def tokens_to_fhat(self, tokens: torch.Tensor) -> torch.Tensor:
        """f_hat (B, Cvae, grid, grid) of a full token sequence (official `embed_to_fhat`, last_one)."""
        self._check_tokens(tokens)
        if tokens.shape[1] != self.config.num_tokens:
            raise ConfigError(f"need all {self.config.num_tokens} tokens to decode, got {tokens.shape[1]}")
        f_hat = self.embedding.weight.new_zeros(tokens.shape[0], self.config.cvae, self.grid, self.grid)
        for si in range(len(self.patch_nums)):
            f_hat.add_(self._upsampled(self.code_map(tokens, si), si))
        return f_hat

    def f_to_tokens(self, f: torch.Tensor) -> torch.Tensor:
        """Multi-scale residual quantization of encoder latents f (B, Cvae, grid, grid) -> tokens (B, L)."""
        b, c, hgt, wid = f.shape
        if (hgt, wid) != (self.grid, self.grid):
            raise ConfigError(f"latents are {hgt}x{wid}, the last patch size is {self.grid}")
        rest, f_hat = f.clone(), torch.zeros_like(f)
        codes = self.embedding.weight
        code_sq = codes.square().sum(1)
        out = []
        for si, pn in enumerate(self.patch_nums):
            z = rest if si == len(self.patch_nums) - 1 else F.interpolate(rest, size=(pn, pn), mode="area")
            z = z.permute(0, 2, 3, 1).reshape(-1, c)
            # |z|^2 + |e|^2 - 2 z.e, written out like the official code so near-ties resolve alike
            idx = torch.cat(
                [
                    (part.square().sum(1, keepdim=True) + code_sq).addmm_(part, codes.T, alpha=-2).argmin(1)
                    for part in z.split(self.CHUNK)
                ]
            )
            h = self._upsampled(self.embedding(idx.view(b, pn, pn)).permute(0, 3, 1, 2), si)
            f_hat.add_(h)
            rest.sub_(h)
            out.append(idx.view(b, pn * pn))
        return torch.cat(out, dim=1)


class VQVAE(nn.Module):
    def __init__(self, config: VARVQConfig):
        super().__init__()
        self.config = config
        self.downsample_factor = config.downsample_factor
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer2(config)
        ks = config.quant_conv_ks
        self.quant_conv = nn.Conv2d(config.cvae, config.cvae, ks, padding=ks // 2)
        self.post_quant_conv = nn.Conv2d(config.cvae, config.cvae, ks, padding=ks // 2)

    def _float_images(self, images: torch.Tensor) -> torch.Tensor:
        weight = self.quant_conv.weight
        if images.dtype == torch.uint8:
            if images.ndim != 4 or images.shape[-1] != self.config.image_channels:
                raise ConfigError(f"uint8 images must be (B, H, W, 3), got shape {tuple(images.shape)}")
            # the official preprocessing: ToTensor (/255), then x * 2 - 1
            x = images.permute(0, 3, 1, 2).to(weight.device, torch.float32) / 255.0
            images = x.add(x).add_(-1)
        elif images.ndim != 4 or images.shape[1] != self.config.image_channels:
            raise ConfigError(
                f"float images must be (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}"
            )
        size = self.config.image_size
        if tuple(images.shape[2:]) != (size, size):
            raise ConfigError(
                f"images must be {size}x{size} for this tokenizer, got {tuple(images.shape[2:])}"
            )
        return images.to(weight.device, weight.dtype)

    @torch.no_grad()
    def encode_to_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) or float (B, 3, H, W) in [-1, 1] -> tokens (B, L), scale by scale."""
        return self.quantize.f_to_tokens(self.quant_conv(self.encoder(self._float_images(images))))

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """(B, Cvae, grid, grid) -> (B, 3, H, W) floats clamped to [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, L) -> uint8 images (B, H, W, 3), converted like the official sampling script:
        ((x + 1) / 2 * 255) truncated."""
        img = self.fhat_to_img(self.quantize.tokens_to_fhat(tokens))
        return img.add(1).mul_(0.5).mul_(255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _suggest(config_name: str):
    def suggest(sd: Mapping[str, torch.Tensor]) -> str | None:
        fits = []
        for name, cfg in VAR_VQ_CONFIGS.items():
            with torch.device("meta"):
                shapes = {k: tuple(v.shape) for k, v in VQVAE(cfg).state_dict().items()}
            if shapes.keys() == sd.keys() and all(tuple(sd[k].shape) == s for k, s in shapes.items()):
                fits.append(name)
        fits = [n for n in fits if n != config_name]
        return f"Its shapes fit VAR VQ-VAE config {fits[0]!r}" if fits else None

    return suggest


def load_var_vqvae(
    path: str | Path, config_name: str = "VAR-VQVAE", device: str | torch.device = "cpu"
) -> VQVAE:
    """Build the named VQ-VAE and strictly load `path` (the official file is a plain state dict).

    As the official `VQVAE.load_state_dict` does, a `quantize.ema_vocab_hit_SV` statistics buffer
    saved for another number of scales is replaced by the model's own (it is never used here).
    """
    if config_name not in VAR_VQ_CONFIGS:
        raise ConfigError(f"unknown VAR VQ-VAE config {config_name!r}; known: {', '.join(VAR_VQ_CONFIGS)}")
    model = VQVAE(VAR_VQ_CONFIGS[config_name])
    state = read_state_dict(path)
    key = "quantize.ema_vocab_hit_SV"
    own = model.quantize.ema_vocab_hit_SV
    if key in state and state[key].ndim == 2 and state[key].shape[0] != own.shape[0]:
        state[key] = own.clone()
    check_state_dict(model, state, str(path), _suggest(config_name))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
