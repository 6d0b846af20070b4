"""MAR (Masked AutoRegressive generation with a diffusion loss), class-conditional, in one file.

Architecture and parameter names follow the official `mar/models/mar.py` and `models/diffloss.py`, so
the official `checkpoint-last.pth` files (`{"model": ..., "model_ema": ...}`; the EMA weights are the
ones evaluated) load with a strict key check:

    class_emb.weight                     (1000, D)    class embeddings; fake_latent (1, D) is the uncond one
    z_proj, z_proj_ln                    Linear(16, D) on the continuous KL-16 latents, then LayerNorm
    encoder_pos_embed_learned            (1, 64 + 256, D)   64 buffer positions, then the image tokens
    encoder_blocks.{i}                   timm Block: norm1, attn.qkv (bias), attn.proj, norm2, mlp.fc1/fc2
    encoder_norm, decoder_embed, mask_token, decoder_pos_embed_learned, decoder_blocks.{i}, decoder_norm
    diffusion_pos_embed_learned          (1, 256, D)  added to the decoder output of each image token
    diffloss.net.*                       SimpleMLPAdaLN: time_embed.mlp.{0,2}, cond_embed, input_proj,
                                         res_blocks.{i}.{in_ln, mlp.{0,2}, adaLN_modulation.1},
                                         final_layer.{norm_final, linear, adaLN_modulation.1}

Tokens are continuous: each image is (256, 16) KL-16 latents (scaled by 0.2325), in raster order. The
encoder sees the 64 buffer positions (all holding the class embedding, or fake_latent for the uncond
half) and the known tokens only; the decoder puts `mask_token` back at the unknown ones and gives every
image position a condition z; the diffusion MLP samples that position's latent from noise given z.

Sampling (official `sample_tokens`): a random order per image; `num_iter` rounds, each predicting the
tokens that leave the mask when its ratio follows cos(pi/2 * (k + 1) / num_iter) (at least one per
round); CFG on the diffusion head's eps, with a scale that grows linearly with the known tokens
("linear") or stays fixed ("constant"); DDPM with a learned variance range over `num_sampling_steps`
respaced steps of the cosine schedule, the noise scaled by the temperature. Training draws the mask
ratio from a truncated normal on [mask_ratio_min, 1] centred at 1 (std 0.25).

Each image's order and every noise draw come from its own seeded generator, indexed by token, so an
image depends on its class and seed only. Attention is written out with two `MatMul` modules, every
projection is a `quantcore.nn.Linear` that receives its token positions (index 0..63 are the buffer).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from quantcore.errors import ConfigError
from quantcore.models import common
from quantcore.models.common import ModelEntry, modulate
from quantcore.nn import Linear, MatMul
from quantcore.quant.layout import FoldSite, OfficialCalibration, QuantLayout

CONTINUOUS_TOKENS = True  # tokens are KL-16 latents (B, n, token_dim): see quantcore.models
# The official checkpoints hold both; the EMA weights are the evaluated ones (PTQ4ARVG uses them too).
CHECKPOINT_KEYS = ("model_ema", "model")
LATENT_SCALE = 0.2325  # KL-16 latents times this are MAR's tokens (official main_mar.py)
CFG_SCHEDULES = ("linear", "constant")
TRAIN_DIFFUSION_STEPS = 1000


@dataclass(frozen=True)
class MARConfig:
    encoder_dim: int
    encoder_depth: int
    decoder_dim: int
    decoder_depth: int
    n_head: int
    diffloss_depth: int
    diffloss_width: int
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    num_classes: int = 1000
    grid_size: int = 16  # 256 px / the VAE's stride 16 / patch size 1
    token_dim: int = 16  # vae_embed_dim * patch_size ** 2
    buffer_size: int = 64
    mask_ratio_min: float = 0.7
    calibration_iters: int = 64  # the PTQ4ARVG scripts' --num_iter: sets the calibration mask
    tokenizer: str = "KL-16"
    variant: str = "masked"

    def __post_init__(self) -> None:
        for dim in (self.encoder_dim, self.decoder_dim):
            if dim % self.n_head:
                raise ConfigError(f"width {dim} must be divisible by n_head {self.n_head}")
        if not 0.0 < self.mask_ratio_min < 1.0:
            raise ConfigError(f"mask_ratio_min must be in (0, 1), got {self.mask_ratio_min}")

    @property
    def num_tokens(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def seq_len(self) -> int:
        """Positions of the decoder (and of a full encoder pass): the buffer, then every image token."""
        return self.buffer_size + self.num_tokens

    def to_dict(self) -> dict:
        return asdict(self)


# Official sizes (mar_base / mar_large / mar_huge) with the DiffLoss MLP of each released checkpoint.
SIZES = {
    "B": dict(encoder_dim=768, encoder_depth=12, decoder_dim=768, decoder_depth=12, n_head=12,
              diffloss_depth=6, diffloss_width=1024),
    "L": dict(encoder_dim=1024, encoder_depth=16, decoder_dim=1024, decoder_depth=16, n_head=16,
              diffloss_depth=8, diffloss_width=1280),
    "H": dict(encoder_dim=1280, encoder_depth=20, decoder_dim=1280, decoder_depth=20, n_head=16,
              diffloss_depth=12, diffloss_width=1536),
}  # fmt: skip


@dataclass(frozen=True)
class SamplingDefaults:
    cfg_scale: float  # official --cfg; 1.0 turns CFG off
    cfg_schedule: str = "linear"
    temperature: float = 1.0  # scales the diffusion noise
    num_iter: int = 64  # masked-generation rounds (the PTQ4ARVG scripts; MAR's README evaluates 256)
    num_sampling_steps: str = "100"  # respacing of the 1000 training steps, as the official string

    def to_dict(self) -> dict:
        return asdict(self)


def _entries() -> dict[str, ModelEntry]:
    vae = ("kl16.ckpt",)
    official = {"mar-b": ("B", 2.9), "mar-l": ("L", 3.0), "mar-h": ("H", 3.2)}
    entries = {
        name: ModelEntry(
            name,
            MARConfig(**SIZES[size]),
            SamplingDefaults(cfg),
            (f"mar_{ {'B': 'base', 'L': 'large', 'H': 'huge'}[size] }/checkpoint-last.pth",) + vae,
            notes="continuous KL-16 tokens, diffusion MLP head (kept in FP when quantized)",
        )
        for name, (size, cfg) in official.items()
    }
    # Every code path in milliseconds (random weights, for tests): 4x4 latents, 4 buffer positions.
    tiny = MARConfig(
        encoder_dim=32,
        encoder_depth=2,
        decoder_dim=32,
        decoder_depth=2,
        n_head=4,
        diffloss_depth=2,
        diffloss_width=32,
        num_classes=10,
        grid_size=4,
        token_dim=4,
        buffer_size=4,
        calibration_iters=4,
        tokenizer="KL-tiny",
    )
    entries["mar-tiny"] = ModelEntry(
        "mar-tiny", tiny, SamplingDefaults(3.0, num_iter=4, num_sampling_steps="5"), tags=("test",)
    )
    return entries


MODELS: dict[str, ModelEntry] = _entries()


# ---------------------------------------------------------------------------------------------------
# The transformer (timm's Block, written out)
# ---------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int):
        super().__init__()
        self.n_head, self.head_dim = n_head, dim // n_head
        self.qkv = Linear(dim, 3 * dim, bias=True)
        self.proj = Linear(dim, dim)
        self.matmul_qk = MatMul()
        self.matmul_pv = MatMul()

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x, pos).view(b, t, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        probs = torch.softmax(self.matmul_qk(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim), dim=-1)
        return self.proj(self.matmul_pv(probs, v).transpose(1, 2).reshape(b, t, d), pos)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x, pos)), pos)


class Block(nn.Module):
    """Pre-LN ViT block, bidirectional attention (every position sees every other)."""

    def __init__(self, dim: int, config: MARConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = Attention(dim, config.n_head)
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), pos)
        return x + self.mlp(self.norm2(x), pos)


# ---------------------------------------------------------------------------------------------------
# The diffusion head (SimpleMLPAdaLN) and its noise schedule
# ---------------------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (cos half, then sin half) of timesteps t (N,)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedder(nn.Module):
    FREQUENCY_DIM = 256

    def __init__(self, width: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(self.FREQUENCY_DIM, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.FREQUENCY_DIM).to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), None, scale, shift))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), None, scale, shift))


class SimpleMLPAdaLN(nn.Module):
    """eps and the variance interpolation v (2 x token_dim outputs) of a noisy token x at step t given z."""

    def __init__(self, config: MARConfig):
        super().__init__()
        w = config.diffloss_width
        self.time_embed = TimestepEmbedder(w)
        self.cond_embed = nn.Linear(config.decoder_dim, w)
        self.input_proj = nn.Linear(config.token_dim, w)
        self.res_blocks = nn.ModuleList(ResBlock(w) for _ in range(config.diffloss_depth))
        self.final_layer = FinalLayer(w, 2 * config.token_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)


class DiffLoss(nn.Module):
    def __init__(self, config: MARConfig):
        super().__init__()
        self.net = SimpleMLPAdaLN(config)


def spaced_timesteps(num_steps: int, sampling_steps: str) -> list[int]:
    """The original steps kept by the official `space_timesteps` (comma-separated section counts;
    "ddimN" for a fixed stride), ascending."""
    try:
        if sampling_steps.startswith("ddim"):
            count = int(sampling_steps[4:])
            for stride in range(1, num_steps):
                if len(range(0, num_steps, stride)) == count:
                    return list(range(0, num_steps, stride))
            raise ConfigError(f"num_sampling_steps {sampling_steps!r}: no integer stride gives {count} steps")
        sections = [int(s) for s in sampling_steps.split(",")]
    except ValueError as exc:
        raise ConfigError(
            f"num_sampling_steps must be a count such as '100' (or 'ddim25'), got {sampling_steps!r}"
        ) from exc
    size, extra = divmod(num_steps, len(sections))
    kept, start = [], 0
    for i, count in enumerate(sections):
        span = size + (1 if i < extra else 0)
        if not 1 <= count <= span:
            raise ConfigError(
                f"num_sampling_steps {sampling_steps!r}: a section of {span} steps cannot hold {count}"
            )
        stride = 1 if count <= 1 else (span - 1) / (count - 1)
        kept += [start + round(j * stride) for j in range(count)]  # Python's round, as the official
        start += span
    return sorted(set(kept))


def _alpha_bar(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


@dataclass(frozen=True)
class DiffusionSchedule:
    """Per-step float64 tables of a (respaced) cosine-schedule DDPM with a learned variance range."""

    timesteps: torch.Tensor  # the original step index fed to the network at each respaced step
    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    posterior_log_variance: torch.Tensor  # clipped at step 0, as the official
    posterior_coef_x0: torch.Tensor
    posterior_coef_xt: torch.Tensor

    @property
    def num_steps(self) -> int:
        return self.timesteps.numel()

    def to(self, device) -> DiffusionSchedule:
        return DiffusionSchedule(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


@functools.cache  # built once per respacing (a Python loop over 1000 steps): training asks every batch
def diffusion_schedule(sampling_steps: str = "", num_steps: int = TRAIN_DIFFUSION_STEPS) -> DiffusionSchedule:
    """The official `create_diffusion(sampling_steps, noise_schedule="cosine")`; "" = every step. The
    tables are shared between callers: read them, do not write them."""
    base = torch.tensor(
        [
            min(1 - _alpha_bar((i + 1) / num_steps) / _alpha_bar(i / num_steps), 0.999)
            for i in range(num_steps)
        ],
        dtype=torch.float64,
    )
    kept = spaced_timesteps(num_steps, sampling_steps) if sampling_steps else list(range(num_steps))
    cumprod = torch.cumprod(1 - base, 0)[kept]
    prev = torch.cat([torch.ones(1, dtype=torch.float64), cumprod[:-1]])
    betas = 1 - cumprod / prev
    variance = betas * (1 - prev) / (1 - cumprod)
    log_variance = torch.log(torch.cat([variance[1:2], variance[1:]])) if len(kept) > 1 else torch.zeros(1)
    return DiffusionSchedule(
        timesteps=torch.tensor(kept),
        betas=betas,
        alphas_cumprod=cumprod,
        posterior_log_variance=log_variance.double(),
        posterior_coef_x0=betas * prev.sqrt() / (1 - cumprod),
        posterior_coef_xt=(1 - prev) * (1 - betas).sqrt() / (1 - cumprod),
    )


@torch.no_grad()
def sample_diffusion(
    net: SimpleMLPAdaLN,
    z: torch.Tensor,
    noise: torch.Tensor,
    schedule: DiffusionSchedule,
    temperature: float,
    cfg: float | torch.Tensor | None,
) -> torch.Tensor:
    """Token latents (N, C) by DDPM (the official `p_sample_loop`, clip_denoised=False).

    z: the conditions, (N, D) or, with `cfg`, (2N, D) as [cond; uncond]; noise (N, steps, C): the
    start x_T, then one draw per step but the last. With CFG, cond and uncond rows see the same x and eps becomes
    uncond + cfg (cond - uncond); the variance comes from the cond rows (the ones the official keeps).
    """
    c = noise.shape[-1]
    x = noise[:, 0].to(z.dtype)
    for i in reversed(range(schedule.num_steps)):
        t = schedule.timesteps[i].expand(z.shape[0])
        out = net(torch.cat([x, x]) if cfg is not None else x, t, z).double()
        eps, v = out[:, :c], out[:, c:]
        if cfg is not None:
            cond, uncond = eps.chunk(2)
            eps, v = uncond + cfg * (cond - uncond), v[: x.shape[0]]
        xd = x.double()
        abar = schedule.alphas_cumprod[i]
        x0 = (1 / abar).sqrt() * xd - (1 / abar - 1).sqrt() * eps
        mean = schedule.posterior_coef_x0[i] * x0 + schedule.posterior_coef_xt[i] * xd
        frac = (v + 1) / 2
        log_var = frac * schedule.betas[i].log() + (1 - frac) * schedule.posterior_log_variance[i]
        if i > 0:  # no noise at the last step
            mean = mean + (0.5 * log_var).exp() * noise[:, schedule.num_steps - i].double() * temperature
        x = mean.to(z.dtype)
    return x


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------


def masked_before_last_round(num_tokens: int, num_iter: int) -> int:
    """Tokens still masked when the last of `num_iter` rounds starts (6 of 256 at 64 rounds)."""
    masked = num_tokens
    for step in range(num_iter - 1):
        masked = next_mask_len(num_tokens, num_iter, step, masked)
    return masked


def next_mask_len(num_tokens: int, num_iter: int, step: int, masked: int) -> int:
    """Tokens left masked after round `step`: the cosine ratio, at least one predicted, one left."""
    ratio = math.cos(math.pi / 2.0 * (step + 1) / num_iter)
    return max(1, min(masked - 1, math.floor(num_tokens * ratio)))


class MAR(nn.Module):
    family = "mar"

    def __init__(self, config: MARConfig):
        super().__init__()
        self.config = config
        enc, dec, n, buf = config.encoder_dim, config.decoder_dim, config.num_tokens, config.buffer_size
        self.class_emb = nn.Embedding(config.num_classes, enc)
        self.fake_latent = nn.Parameter(torch.zeros(1, enc))
        self.z_proj = Linear(config.token_dim, enc)
        self.z_proj_ln = nn.LayerNorm(enc, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buf + n, enc))
        self.encoder_blocks = nn.ModuleList(Block(enc, config) for _ in range(config.encoder_depth))
        self.encoder_norm = nn.LayerNorm(enc, eps=config.norm_eps)
        self.decoder_embed = Linear(enc, dec)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buf + n, dec))
        self.decoder_blocks = nn.ModuleList(Block(dec, config) for _ in range(config.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dec, eps=config.norm_eps)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, n, dec))
        self.diffloss = DiffLoss(config)

    @property
    def null_class(self) -> int:
        """The class id of the uncond CFG half: it takes `fake_latent` instead of a class embedding."""
        return self.config.num_classes

    def class_embedding(self, classes: torch.Tensor) -> torch.Tensor:
        uncond = (classes == self.null_class)[:, None]
        return torch.where(uncond, self.fake_latent, self.class_emb(classes.clamp(max=self.null_class - 1)))

    # -- the transformer -----------------------------------------------------------------------------

    def encode(self, tokens: torch.Tensor, mask: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """The encoder's output (B, buffer + known, enc) for tokens (B, n, C), mask (B, n) bool (True =
        unknown; every row the same count), classes (B,)."""
        b, buf = tokens.shape[0], self.config.buffer_size
        x = self.z_proj(tokens)
        x = torch.cat([self.class_embedding(classes)[:, None].expand(b, buf, -1), x], dim=1)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
        keep = torch.cat([mask.new_zeros(b, buf), mask], dim=1).logical_not()
        x = x[keep].view(b, -1, x.shape[-1])
        # the token index (buffer first): what the static token-wise tables are looked up by
        pos = torch.arange(x.shape[1], device=x.device)
        for block in self.encoder_blocks:
            x = block(x, pos)
        return self.encoder_norm(x)

    def decode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The diffusion conditions z (B, n, dec) of every image position."""
        b, buf = x.shape[0], self.config.buffer_size
        x = self.decoder_embed(x)
        keep = torch.cat([mask.new_zeros(b, buf), mask], dim=1).logical_not()
        full = self.mask_token.to(x.dtype).expand(b, keep.shape[1], -1).clone()
        full[keep] = x.reshape(-1, x.shape[-1])
        x = full + self.decoder_pos_embed_learned
        pos = torch.arange(x.shape[1], device=x.device)
        for block in self.decoder_blocks:
            x = block(x, pos)
        return self.decoder_norm(x)[:, buf:] + self.diffusion_pos_embed_learned

    def calibration_mask(self, batch: int, device) -> torch.Tensor:
        """The mask of the last generation round (where the official PTQ4ARVG hook captures its inputs):
        its count under `calibration_iters` rounds, at positions of one fixed order."""
        cfg = self.config
        # CPU draws (device="cpu" also inside a `torch.device("cuda")` block): the same mask on every device
        order = torch.randperm(cfg.num_tokens, generator=torch.Generator().manual_seed(0), device="cpu")
        mask = torch.zeros(cfg.num_tokens, dtype=torch.bool, device="cpu")
        mask[order[: masked_before_last_round(cfg.num_tokens, cfg.calibration_iters)]] = True
        return mask.to(device).expand(batch, -1)

    def sequence_logits(
        self, classes: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Teacher-forced conditions z (B, n, dec) for tokens (B, n, C): MAR's counterpart of the other
        families' logits (what the diffusion head reads). `mask` (B, n) defaults to the calibration mask."""
        if tokens.ndim != 3 or tokens.shape[1:] != (self.config.num_tokens, self.config.token_dim):
            raise ConfigError(
                f"MAR tokens are (B, {self.config.num_tokens}, {self.config.token_dim}) latents, "
                f"got shape {tuple(tokens.shape)}"
            )
        if mask is None:
            mask = self.calibration_mask(tokens.shape[0], tokens.device)
        z = self.decode(self.encode(tokens, mask, classes), mask)
        return z.to(torch.promote_types(z.dtype, torch.float32))

    def setup_caches(self, batch_size: int, dtype: torch.dtype | None = None) -> None:
        """MAR's attention is bidirectional over a changing set of tokens: there is no KV cache."""

    def clear_caches(self) -> None:
        """No KV cache (see setup_caches)."""

    # -- training --------------------------------------------------------------------------------------

    def training_mask(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """A random order per image masking ceil(n * r) tokens, r from the official truncated normal on
        [mask_ratio_min, 1] (loc 1, std 0.25), drawn once per batch."""
        n = self.config.num_tokens
        cpu = {"device": "cpu"}  # `generator` is a CPU one, also inside a `torch.device("cuda")` block
        lo = torch.special.ndtr(
            torch.tensor((self.config.mask_ratio_min - 1.0) / 0.25, dtype=torch.float64, **cpu)
        )
        u = lo + (0.5 - lo) * torch.rand((), generator=generator, dtype=torch.float64, **cpu)
        ratio = 1.0 + 0.25 * float(torch.special.ndtri(u))
        count = math.ceil(n * ratio)
        orders = torch.stack([torch.randperm(n, generator=generator, **cpu) for _ in range(batch)])
        mask = torch.zeros(batch, n, dtype=torch.bool, **cpu)
        mask.scatter_(1, orders[:, :count], True)
        return mask.to(self.fake_latent.device)


def build(config: MARConfig) -> MAR:
    """The model as the official constructor leaves it: officially initialised (zeros on "meta")."""
    return init_official(MAR(config))


@torch.no_grad()
def init_official(model: MAR) -> MAR:
    """The official initialisation (from the global torch seed): xavier-uniform linears with zero bias,
    unit LayerNorms, N(0, 0.02) embeddings and tables; in the diffusion MLP N(0, 0.02) timestep
    embedding and zeros for every AdaLN linear and the output layer (so it starts predicting eps = 0)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm) and module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for table in (model.class_emb.weight, model.fake_latent, model.mask_token, model.encoder_pos_embed_learned,
                  model.decoder_pos_embed_learned, model.diffusion_pos_embed_learned):  # fmt: skip
        nn.init.normal_(table, std=0.02)
    net = model.diffloss.net
    nn.init.normal_(net.time_embed.mlp[0].weight, std=0.02)
    nn.init.normal_(net.time_embed.mlp[2].weight, std=0.02)
    for zeroed in [b.adaLN_modulation[1] for b in net.res_blocks] + [
        net.final_layer.adaLN_modulation[1],
        net.final_layer.linear,
    ]:
        nn.init.zeros_(zeroed.weight)
        nn.init.zeros_(zeroed.bias)
    return model


def diffusion_loss(
    model: MAR,
    classes: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    generator: torch.Generator,
    repeats: int = 4,
) -> torch.Tensor:
    """The simple (eps-MSE) diffusion loss over the masked tokens, per image (B,): a random step and
    noise per token and repeat (official diffusion_batch_mul = 4). The official training loss adds the
    variational term that trains the variance outputs; this is the part that measures the prediction.
    Seeded, so the FP and a quantized model are scored on the same draws (a teacher-forced fidelity)."""
    b, n, c = tokens.shape
    dev = tokens.device
    z = model.sequence_logits(classes, tokens, mask).to(tokens.dtype)
    schedule = diffusion_schedule().to(dev)
    t = torch.randint(0, schedule.num_steps, (repeats, b, n), generator=generator, device="cpu").to(dev)
    noise = torch.randn(repeats, b, n, c, generator=generator, device="cpu").to(dev, torch.float64)
    abar = schedule.alphas_cumprod[t][..., None]
    x_t = abar.sqrt() * tokens.double() + (1 - abar).sqrt() * noise
    cond = z.expand(repeats, -1, -1, -1).reshape(-1, z.shape[-1])
    out = model.diffloss.net(x_t.reshape(-1, c).to(tokens.dtype), t.reshape(-1), cond)
    err = (out[:, :c].double() - noise.reshape(-1, c)).pow(2).mean(-1).view(repeats, b, n)
    weight = mask.double().expand(repeats, -1, -1)
    return (err * weight).sum((0, 2)) / weight.sum((0, 2)).clamp(min=1)


def training_loss(
    model: MAR,
    classes: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    generator: torch.Generator,
    repeats: int = 4,
) -> torch.Tensor:
    """The official training objective (DiffLoss, learn_sigma, MSE loss type): eps-MSE plus the
    variational bound that trains the variance interpolation v (the predicted mean's gradient stopped
    in it), in bits, over the masked tokens with `repeats` draws of step and noise each (official
    diffusion_batch_mul = 4). At step 0 the bound's decoder term is a Gaussian NLL of the latent; the
    official discretised one assumes 8-bit pixels, which latents are not. `generator` on tokens' device."""
    c, dev = tokens.shape[-1], tokens.device
    z = model.decode(model.encode(tokens, mask, classes), mask)
    pick = mask.nonzero(as_tuple=True)
    z, x0 = z[pick].repeat(repeats, 1), tokens[pick].float().repeat(repeats, 1)
    schedule = diffusion_schedule().to(dev)
    t = torch.randint(0, schedule.num_steps, (x0.shape[0],), generator=generator, device=dev)
    noise = torch.randn(x0.shape, generator=generator, device=dev)
    abar = schedule.alphas_cumprod[t][:, None].float()
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    out = model.diffloss.net(x_t, t, z).float()
    eps, v = out[:, :c], out[:, c:]
    coef_x0, coef_xt = (
        schedule.posterior_coef_x0[t][:, None].float(),
        schedule.posterior_coef_xt[t][:, None].float(),
    )
    x0_pred = (x_t - (1 - abar).sqrt() * eps.detach()) / abar.sqrt()
    mean_p, mean_q = coef_x0 * x0_pred + coef_xt * x_t, coef_x0 * x0 + coef_xt * x_t
    log_var_q = schedule.posterior_log_variance[t][:, None].float()
    frac = (v + 1) / 2
    log_var_p = frac * schedule.betas[t][:, None].float().log() + (1 - frac) * log_var_q
    kl = 0.5 * (
        -1
        + log_var_p
        - log_var_q
        + (log_var_q - log_var_p).exp()
        + (mean_q - mean_p) ** 2 * (-log_var_p).exp()
    )
    nll = 0.5 * (math.log(2 * math.pi) + log_var_p + (x0 - mean_p) ** 2 * (-log_var_p).exp())
    vb = torch.where(t[:, None] == 0, nll, kl).mean(-1) / math.log(2.0)
    return ((eps - noise).pow(2).mean(-1) + vb).mean()


def teacher_forced_loss(model: MAR, classes: torch.Tensor, tokens: torch.Tensor, generator) -> torch.Tensor:
    """The family's held-out fidelity loss: the diffusion loss under training-style masks (one seeded
    ratio and order per batch), so every mask ratio the model meets in sampling is scored."""
    return diffusion_loss(model, classes, tokens, model.training_mask(tokens.shape[0], generator), generator)


# ---------------------------------------------------------------------------------------------------
# Quantization layout (reference §4, MAR row)
# ---------------------------------------------------------------------------------------------------


def quant_layout(model: MAR) -> QuantLayout:
    """The official MAR quantization: every encoder and decoder block's qkv, proj, fc1, fc2, nothing else.

    qkv reads norm1 and fc1 reads norm2 (the folds go into the LayerNorms' affine); proj and fc2 are
    plain. Kept in FP as the official code does: z_proj, decoder_embed, the whole diffusion MLP (diffloss),
    the attention matmuls (the official keeps timm's fused attention: no matmul sites) and the VAE. The 64
    buffer positions are the sinks, each with its own STWQ parameters, the image tokens share one.
    """
    cfg = model.config
    sites, plain = [], []
    for stack, depth in (("encoder_blocks", cfg.encoder_depth), ("decoder_blocks", cfg.decoder_depth)):
        for i in range(depth):
            pre = f"{stack}.{i}"
            sites.append(FoldSite(f"{pre}.norm1", (f"{pre}.attn.qkv",)))
            sites.append(FoldSite(f"{pre}.norm2", (f"{pre}.mlp.fc1",)))
            plain += [f"{pre}.attn.proj", f"{pre}.mlp.fc2"]
    groups = torch.full((cfg.seq_len,), cfg.buffer_size, dtype=torch.long)
    groups[: cfg.buffer_size] = torch.arange(cfg.buffer_size)
    return QuantLayout(
        fold_sites=tuple(sites),
        plain_linears=tuple(plain),
        matmuls=(),
        prob_matmuls=(),
        sink_positions=tuple(range(cfg.buffer_size)),
        position_groups=groups,
        seq_len=cfg.seq_len,
        feature_module=f"decoder_blocks.{cfg.decoder_depth - 1}",
        # RAR-like: the whole set in one forward, ranges containing 0, only reset quantizers recalibrated
        official=OfficialCalibration(include_zero=True, recalibrate_all=False),
    )


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------


class DecodePlan(common.DecodePlan):
    """MAR's masked generation: `num_iter` rounds, each a full encoder-decoder pass and one diffusion
    sampling of the tokens it predicts. The encoder drops the unknown tokens, so its width changes
    every round and the plan runs step by step (`capturable = False`)."""

    capturable = False

    def __init__(self, model: MAR, batch: int, sampling: dict, compile: bool):
        cfg = model.config
        self.model, self.batch = model, batch
        n = cfg.num_tokens
        self.cfg_scale = float(sampling["cfg_scale"])
        self.temperature = float(sampling["temperature"])
        self.cfg_schedule = str(sampling["cfg_schedule"])
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ConfigError(f"cfg_schedule must be one of {list(CFG_SCHEDULES)}, got {self.cfg_schedule!r}")
        self.steps = int(sampling["num_iter"])
        if not 1 <= self.steps <= n:
            raise ConfigError(
                f"num_iter must be in [1, {n}] (one token per round at least), got {self.steps}"
            )
        self.guided = self.cfg_scale != 1.0
        self.rows = 2 * batch if self.guided else batch
        dev, dtype = model.fake_latent.device, model.fake_latent.dtype
        self.schedule = diffusion_schedule(str(sampling["num_sampling_steps"])).to(dev)
        # tokens left masked after each round, known up front: the schedule is the same for every image
        self.mask_lens, masked = [], n
        for step in range(self.steps):
            masked = 0 if step == self.steps - 1 else next_mask_len(n, self.steps, step, masked)
            self.mask_lens.append(masked)
        self.tokens = torch.zeros(batch, n, cfg.token_dim, dtype=dtype, device=dev)
        self.caches = []  # no KV cache; `compile` is not used either: the token count changes every round

    def tokens_after(self, step: int) -> int:
        return self.tokens.shape[1] - self.mask_lens[step]

    def reset(self, classes: torch.Tensor, seeds: list[int]) -> None:
        cfg, dev = self.model.config, self.tokens.device
        orders, noises = [], []
        for seed in seeds:
            g = torch.Generator().manual_seed(int(seed))
            orders.append(torch.randperm(cfg.num_tokens, generator=g, device="cpu"))
            # per token: x_T, then one draw per diffusion step but the last (which adds no noise)
            noises.append(
                torch.randn(cfg.num_tokens, self.schedule.num_steps, cfg.token_dim, generator=g, device="cpu")
            )
        self.orders = torch.stack(orders).to(dev)
        self.noise = torch.stack(noises).to(dev)
        self.tokens.zero_()
        self.mask = torch.ones(self.batch, cfg.num_tokens, dtype=torch.bool, device=dev)
        self.classes = (
            torch.cat([classes, torch.full_like(classes, self.model.null_class)]) if self.guided else classes
        )
        self.round = 0

    def step(self) -> None:
        m, n = self.model, self.tokens.shape[1]
        mask_len = self.mask_lens[self.round]
        rows_tokens = torch.cat([self.tokens, self.tokens]) if self.guided else self.tokens
        rows_mask = torch.cat([self.mask, self.mask]) if self.guided else self.mask
        z = m.decode(m.encode(rows_tokens, rows_mask, self.classes), rows_mask)
        mask_next = torch.zeros_like(self.mask)
        mask_next.scatter_(1, self.orders[:, :mask_len], True)
        to_pred = self.mask & ~mask_next
        image, index = to_pred.nonzero(as_tuple=True)
        cond = z[: self.batch][image, index]
        cfg = None
        if self.guided:
            # the official linear ramp reads the count left masked after this round (1 in the last)
            left = mask_len if self.round < self.steps - 1 else 1
            cfg = (
                1 + (self.cfg_scale - 1) * (n - left) / n if self.cfg_schedule == "linear" else self.cfg_scale
            )
            cond = torch.cat([cond, z[self.batch :][image, index]])
        latents = sample_diffusion(
            m.diffloss.net, cond, self.noise[image, index], self.schedule, self.temperature, cfg
        )
        self.tokens[image, index] = latents.to(self.tokens.dtype)
        self.mask = mask_next
        self.round += 1


@torch.no_grad()
def encode_images(model: MAR, tokenizer, images: torch.Tensor) -> torch.Tensor:
    """Token latents (B, n, C) in raster order of uint8 images (B, H, W, 3): the VAE's posterior mean
    times 0.2325, patchified (patch size 1)."""
    latents = tokenizer.encode_latents(images) * LATENT_SCALE
    return latents.flatten(2).transpose(1, 2).contiguous()


def decode_images(model: MAR, tokenizer, tokens: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, H, W, 3) from token latents (B, n, C) in raster order: the VAE decodes
    tokens / 0.2325 unpatchified to (B, C, h, w)."""
    grid = model.config.grid_size
    latents = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, grid, grid)
    return tokenizer.decode_latents(latents / LATENT_SCALE)
