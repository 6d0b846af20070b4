"""VAR (Visual AutoRegressive modeling: next-scale prediction), d16 / d20 / d24 / d30, in one file.

Architecture and parameter names follow the official `models/var.py` + `basic_var.py` as built by
`build_vae_var(..., depth=d, shared_aln=False, attn_l2_norm=True)`, so an official release file
(`var_d{16,20,24,30}.pth`, a plain state dict) loads with a strict key check:

    word_embed.{weight,bias}            Linear(Cvae, C): f_hat maps -> token embeddings (not quantized)
    class_emb.weight                    (num_classes + 1, C); row num_classes = the null class (CFG)
    pos_start (1, 1, C), pos_1LC (1, L, C), lvl_embed.weight (10, C)
    blocks.{i}.ada_lin.1.{weight,bias}  AdaLN Linear(C, 6C); rows [gamma1, gamma2, scale1, scale2, shift1, shift2]
    blocks.{i}.attn.mat_qkv.weight      Linear(C, 3C, bias=False)
    blocks.{i}.attn.{q_bias,v_bias}     (C,) each; buffer blocks.{i}.attn.zero_k_bias
    blocks.{i}.attn.scale_mul_1H11      (1, H, 1, 1) per-head log temperature of the l2-normed q
    blocks.{i}.attn.proj.*, blocks.{i}.ffn.fc1.*, blocks.{i}.ffn.fc2.*
    head_nm.ada_lin.1.{weight,bias}     AdaLN before the head: rows [scale, shift]
    head.{weight,bias}                  Linear(C, 4096)
    lvl_1L (1, L), attn_bias_for_masking (1, 1, L, L)   persistent buffers in the official model, so
                                        they are in the release files and persistent here too

Width C = 64 d, heads = d, mlp_ratio 4, LayerNorm without affine (eps 1e-6). A block computes
    x += attn(LN(x) * (one1 + scale1) + shift1) * gamma1
    x += ffn(LN(x) * (one2 + scale2) + shift2) * gamma2        ffn = fc2(GELU_tanh(fc1 .))
with (gamma1, ..., shift2) = ada_lin(cond), cond = class_emb[label] for every token of the sample.
`one1`/`one2` (and `head_nm.one`) are None buffers standing for the constant 1; folding a smoothing
scale s into the AdaLN rows turns them into the vector 1/s (quantcore.quant.layout.AdaLNRows).
Attention is l2-normalised: q = normalize(q) * exp(min(scale_mul_1H11, log 100)), k = normalize(k),
softmax(q k^T) with scale 1, written out with two `MatMul`s so both can be quantized.

The qkv bias (pitfall 6). The official checkpoint stores the qkv bias as q_bias, v_bias and a zero
k bias, never as mat_qkv.bias; the official forward adds cat(q_bias, zero_k_bias, v_bias) itself and
PTQ4ARVG's scripts instead copy it into mat_qkv.bias after loading (forgetting that step silently
drops it). Here the split is made permanent and explicit: q_bias / v_bias / zero_k_bias stay the
model's (checkpoint-facing, strictly loaded) bias and `SelfAttention.forward` always adds
`qkv_bias()` to mat_qkv's output; `mat_qkv.bias` starts as None and holds only what quantization
folds in (the shift compensation W'p, created by `fold_shift` like for any bias-free linear). The
effective bias is their sum. So there is no post-load step to forget, official files load strictly,
the q/v bias is always used, a folded model's state dict round-trips through artifacts unchanged,
and the quantized path (QuantLinear) reads mat_qkv.bias as usual; a real low-bit kernel that replaces
mat_qkv needs nothing more, since the constant q/v bias is added after it in FP.

Sequence layout: the 10 scales (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)^2 one after another, L = 680 tokens,
raster order inside a scale. Absolute position p holds the input that predicts token p: position 0 is
the start token (class embedding + pos_start), the inputs of scale k > 0 are word_embed(f_hat after
scales < k, area-downsampled to k x k). The block-causal mask lets a position see every position of
its own and earlier scales. Linears receive these absolute positions (0..679) as `pos`; the AdaLN
linears read the condition, one vector per sample, as a length-1 token axis with pos = [0] (their STWQ
table is per-tensor). Building scale inputs needs the VQ-VAE's quantizer: `bind_tokenizer`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from quantcore.errors import ConfigError
from quantcore.models import common
from quantcore.models.common import ModelEntry, modulate
from quantcore.nn import (
    Linear,
    MatMul,
    allocate_kv_caches,
    free_kv_caches,
    fused_attention,
    read_kv,
    write_kv,
)
from quantcore.quant.layout import AdaLNRows, FoldSite, OfficialCalibration, QuantLayout
from quantcore.tokenizers.var_vqvae import OFFICIAL_PATCH_NUMS

# Row order of the AdaLN linears' outputs (official `unbind(2)` orders).
ADA_CHUNKS = ("gamma1", "gamma2", "scale1", "scale2", "shift1", "shift2")
HEAD_CHUNKS = ("scale", "shift")
# float32(log 100): the official clamp bound `torch.log(torch.tensor(100)).item()`.
MAX_SCALE_MUL = 4.605170249938965


@dataclass(frozen=True)
class VARConfig:
    depth: int
    embed_dim: int  # C (= D, the condition width); 64 * depth for the official models
    num_heads: int  # = depth for the official models
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    num_classes: int = 1000
    vocab_size: int = 4096
    cvae: int = 32  # VQ-VAE code width
    patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS
    tokenizer: str = "VAR-VQVAE"

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}")
        if len(self.patch_nums) < 2 or list(self.patch_nums) != sorted(set(self.patch_nums)):
            raise ConfigError(f"patch_nums must be >= 2 strictly increasing sizes, got {self.patch_nums}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return round(self.embed_dim * self.mlp_ratio)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def first_l(self) -> int:
        return self.patch_nums[0] ** 2

    @property
    def scale_bounds(self) -> tuple[tuple[int, int], ...]:
        """(start, end) positions of every scale."""
        bounds, start = [], 0
        for pn in self.patch_nums:
            bounds.append((start, start + pn * pn))
            start += pn * pn
        return tuple(bounds)

    @property
    def num_tokens(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    @property
    def seq_len(self) -> int:
        """Input positions of the teacher-forced pass: one per generated token (L = 680)."""
        return self.num_tokens

    @property
    def grid_size(self) -> int:
        return self.patch_nums[-1]

    @property
    def variant(self) -> str:
        return "next-scale"

    def scale_of_position(self) -> torch.Tensor:
        """(L,) scale index of every absolute position (the official `lvl_1L`)."""
        return torch.cat(
            [torch.full((pn * pn,), i, dtype=torch.long) for i, pn in enumerate(self.patch_nums)]
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SamplingDefaults:
    """Official `autoregressive_infer_cfg` settings of the PTQ4ARVG evaluation (sample_quant.py)."""

    cfg_scale: float = 1.5  # t = cfg * si / (num_scales - 1); logits = (1 + t) cond - t uncond
    top_k: int = 900
    top_p: float = 0.96
    more_smooth: bool = False  # the Gumbel "smooth" visualisation mode; tokens cannot express it
    temperature: float = 1.0  # not an official knob (always 1 there); logits / temperature after CFG

    def to_dict(self) -> dict:
        return asdict(self)


def _entries() -> dict[str, ModelEntry]:
    vae = "vae_ch160v4096z32.pth"
    notes = (
        "official evaluation samples under fp16 autocast and reseeds one generator with 42 per batch; "
        "here every image draws from its own seeded generator. The official calibration pool was sampled "
        "with top_p 0.95"
    )
    entries = {
        f"var-d{d}": ModelEntry(
            f"var-d{d}",
            VARConfig(depth=d, embed_dim=64 * d, num_heads=d),
            SamplingDefaults(),
            (f"var_d{d}.pth", vae),
            notes=notes,
        )
        for d in (16, 20, 24, 30)
    }
    # Every code path (4 scales, 2 blocks, 4 shared phi convs) in milliseconds, random weights.
    entries["var-tiny"] = ModelEntry(
        "var-tiny",
        VARConfig(
            depth=2,
            embed_dim=64,
            num_heads=4,
            num_classes=10,
            vocab_size=64,
            cvae=8,
            patch_nums=(1, 2, 3, 4),
            tokenizer="VAR-VQVAE-tiny",
        ),
        SamplingDefaults(),
        tags=("test",),
    )
    return entries


MODELS: dict[str, ModelEntry] = _entries()


# ---------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------


def _adaln(ada_lin: nn.Sequential, cond: torch.Tensor) -> torch.Tensor:
    """ada_lin(cond) for cond (B, D): the linear reads a length-1 token axis at position 0."""
    return ada_lin[1](ada_lin[0](cond[:, None]), cond.new_zeros(1, dtype=torch.long))


class FFN(nn.Module):
    def __init__(self, config: VARConfig):
        super().__init__()
        self.fc1 = Linear(config.embed_dim, config.mlp_hidden)
        self.fc2 = Linear(config.mlp_hidden, config.embed_dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x, pos), approximate="tanh"), pos)


class SelfAttention(nn.Module):
    def __init__(self, config: VARConfig):
        super().__init__()
        c, self.num_heads, self.head_dim = config.embed_dim, config.num_heads, config.head_dim
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, self.num_heads, 1, 1), 4.0).log())
        self.mat_qkv = Linear(c, 3 * c, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(c))
        self.v_bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("zero_k_bias", torch.zeros(c))
        self.proj = Linear(c, c)
        self.matmul_qk = MatMul()
        self.matmul_pv = MatMul()
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)
        self.kv_codec = None  # 8-bit cache storage (quantcore.quant.real.KVCodec), set by to_real
        self.fused_attention = None  # one kernel over the cache (quantcore.quant.real.FusedAttention)

    def qkv_bias(self) -> torch.Tensor:
        """The checkpoint's qkv bias, added after mat_qkv (which holds only folded-in bias)."""
        return torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor, attn_bias: torch.Tensor | None, use_cache: bool
    ) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.mat_qkv(x, pos) + self.qkv_bias()
        q, k, v = qkv.view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp())
        k = F.normalize(k, dim=-1)
        if use_cache:
            write_kv(self, b, pos, k, v)
            # the bias spans every cached key; without one, up to the last position
            kv_len = attn_bias.shape[-1] if attn_bias is not None else int(pos.max()) + 1
            if self.fused_attention is not None:
                # cached decoding: every query sees every cached key (the scale's bias slice is all zero)
                out = fused_attention(self, q, b, pos, kv_len, False, 1.0)
                return self.proj(out.transpose(1, 2).reshape(b, t, c), pos)
            k, v = read_kv(self, b, kv_len, q.dtype)
        scores = self.matmul_qk(q, k.transpose(-2, -1))  # attn_l2_norm: scale 1
        if attn_bias is not None:
            scores = scores + attn_bias.to(scores.dtype)
        probs = torch.softmax(scores.float(), dim=-1).type_as(q)
        out = self.matmul_pv(probs, v).transpose(1, 2).reshape(b, t, c)
        return self.proj(out, pos)


class AdaLNSelfAttn(nn.Module):
    def __init__(self, config: VARConfig):
        super().__init__()
        c = config.embed_dim
        self.C = c
        self.attn = SelfAttention(config)
        self.ffn = FFN(config)
        self.ln_wo_grad = nn.LayerNorm(c, eps=config.norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), Linear(c, 6 * c))
        self.register_buffer("one1", None)  # the "1 +" of scale1; 1/s once a scale is folded in
        self.register_buffer("one2", None)

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        pos: torch.Tensor,
        attn_bias: torch.Tensor | None,
        use_cache: bool,
    ) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (
            _adaln(self.ada_lin, cond).view(-1, 1, 6, self.C).unbind(2)
        )
        h = modulate(self.ln_wo_grad(x), self.one1, scale1, shift1)
        x = x + self.attn(h, pos, attn_bias, use_cache) * gamma1
        h = modulate(self.ln_wo_grad(x), self.one2, scale2, shift2)
        return x + self.ffn(h, pos) * gamma2


class AdaLNBeforeHead(nn.Module):
    def __init__(self, config: VARConfig):
        super().__init__()
        c = config.embed_dim
        self.C = c
        self.ln_wo_grad = nn.LayerNorm(c, eps=config.norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), Linear(c, 2 * c))
        self.register_buffer("one", None)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = _adaln(self.ada_lin, cond).view(-1, 1, 2, self.C).unbind(2)
        return modulate(self.ln_wo_grad(x), self.one, scale, shift)


class VAR(nn.Module):
    family = "var"

    def __init__(self, config: VARConfig):
        super().__init__()
        self.config = config
        c, n = config.embed_dim, config.num_tokens
        init_std = math.sqrt(1 / c / 3)
        self.word_embed = nn.Linear(config.cvae, c)
        self.class_emb = nn.Embedding(config.num_classes + 1, c)
        self.pos_start = nn.Parameter(torch.empty(1, config.first_l, c))
        self.pos_1LC = nn.Parameter(torch.empty(1, n, c))
        self.lvl_embed = nn.Embedding(config.num_scales, c)
        for t in (self.class_emb.weight, self.pos_start, self.pos_1LC, self.lvl_embed.weight):
            nn.init.trunc_normal_(t, mean=0.0, std=init_std)
        self.blocks = nn.ModuleList(AdaLNSelfAttn(config) for _ in range(config.depth))
        lvl = config.scale_of_position().to(self.pos_1LC.device)
        self.register_buffer("lvl_1L", lvl[None].clone())
        allowed = lvl[:, None] >= lvl[None, :]  # a query sees its own and every earlier scale
        bias = torch.zeros(n, n, device=lvl.device).masked_fill(~allowed, float("-inf"))
        self.register_buffer("attn_bias_for_masking", bias.reshape(1, 1, n, n))
        self.head_nm = AdaLNBeforeHead(config)
        self.head = Linear(c, config.vocab_size)
        # True: teacher-forced passes use the block-causal mask (what the KV-cache sampler computes).
        # False reproduces the official PTQ4ARVG calibration pass, which runs unmasked (pitfall 8);
        # it then applies to every sequence_logits call (calibration, DGC features, fidelity KL).
        self.teacher_forcing_mask = True
        self._quantizer: tuple | None = None  # (VectorQuantizer2,), outside the module tree

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    # -- the VQ-VAE link ------------------------------------------------------------------------------

    def bind_quantizer(self, quantizer: nn.Module) -> None:
        """Keep the VQ-VAE quantizer (codebook + phi convs) for building scale inputs; it stays out of
        this model's parameters, state_dict and quantization (a tuple hides it from nn.Module)."""
        self._quantizer = (quantizer,)

    @property
    def quantizer(self):
        if self._quantizer is None:
            raise ConfigError(
                "VAR builds each scale's input from its VQ-VAE: call "
                "quantcore.models.bind_tokenizer(model, tokenizer) first"
            )
        return self._quantizer[0]

    # -- inputs ------------------------------------------------------------------------------------

    def lvl_pos(self) -> torch.Tensor:
        """(1, L, C) level + absolute position embedding of every position."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def first_scale_input(self, cond: torch.Tensor, lvl_pos: torch.Tensor) -> torch.Tensor:
        """(B, first_l, C): the start token(s) from the class embeddings cond (B, C)."""
        first = self.config.first_l
        return cond[:, None].expand(-1, first, -1) + self.pos_start + lvl_pos[:, :first]

    def scale_input(self, maps: torch.Tensor, start: int, lvl_pos: torch.Tensor) -> torch.Tensor:
        """word_embed of f_hat features (B, n, Cvae) placed at positions start .. start + n."""
        maps = maps.to(self.word_embed.weight.device, self.word_embed.weight.dtype)
        return self.word_embed(maps) + lvl_pos[:, start : start + maps.shape[1]]

    def embed_sequence(
        self, classes: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced input (B, T, C) and condition (B, C) for tokens (B, n) of the first k scales.

        T = end of scale k (the inputs of scales 0..k; all L for a full sequence).
        """
        cond = self.class_emb(classes)
        lvl_pos = self.lvl_pos()
        x = self.first_scale_input(cond, lvl_pos)
        maps = self.quantizer.tokens_to_var_input(tokens)
        if maps.shape[1]:
            x = torch.cat([x, self.scale_input(maps, self.config.first_l, lvl_pos)], dim=1)
        return x, cond

    def setup_caches(self, batch_size: int, dtype: torch.dtype | None = None) -> None:
        cfg = self.config
        dtype = dtype or self.pos_1LC.dtype
        shape = (batch_size, cfg.num_heads, cfg.seq_len, cfg.head_dim)
        allocate_kv_caches([block.attn for block in self.blocks], shape, dtype, self.pos_1LC.device)

    def clear_caches(self) -> None:
        free_kv_caches([block.attn for block in self.blocks])

    # -- the transformer -----------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        pos: torch.Tensor,
        use_cache: bool = False,
        masked: bool = True,
    ) -> torch.Tensor:
        """Logits (B, T, V) for inputs x (B, T, C) at absolute positions pos (T,), condition cond (B, C).

        Without the cache the T positions attend to each other under the block-causal mask (or not at
        all masked); with it they attend to everything cached up to the last position.
        """
        table = self.attn_bias_for_masking[0, 0]
        if use_cache:
            bias = table[pos][:, : int(pos.max()) + 1]
        else:
            bias = table[pos][:, pos] if masked else None
        for block in self.blocks:
            x = block(x, cond, pos, bias, use_cache)
        return self.head(self.head_nm(x, cond), pos).float()

    def sequence_logits(
        self, classes: torch.Tensor, tokens: torch.Tensor, masked: bool | None = None
    ) -> torch.Tensor:
        """Teacher-forced logits (B, L, V) of full sequences (B, L); row p predicts token p.

        masked=None uses `self.teacher_forcing_mask` (block-causal unless switched off).
        """
        x, cond = self.embed_sequence(classes, tokens)
        pos = torch.arange(x.shape[1], device=x.device)
        return self(x, cond, pos, masked=self.teacher_forcing_mask if masked is None else masked)


# ---------------------------------------------------------------------------------------------------
# Quantization layout (reference §4/§6, VAR rows)
# ---------------------------------------------------------------------------------------------------


def quant_layout(model: VAR) -> QuantLayout:
    cfg = model.config
    sites, plain, matmuls, probs = [], [], [], []
    first_vs_rest = torch.zeros(cfg.seq_len, dtype=torch.long)
    first_vs_rest[cfg.first_l :] = 1
    per_tensor = torch.zeros(1, dtype=torch.long)  # the condition has no token axis
    linear_groups: dict[str, torch.Tensor] = {}
    chunk = ADA_CHUNKS.index
    for i in range(cfg.depth):
        pre = f"blocks.{i}"
        ada = f"{pre}.ada_lin.1"
        sites.append(
            FoldSite(
                AdaLNRows(ada, len(ADA_CHUNKS), chunk("scale1"), chunk("shift1"), f"{pre}.one1"),
                (f"{pre}.attn.mat_qkv",),
            )
        )
        sites.append(
            FoldSite(
                AdaLNRows(ada, len(ADA_CHUNKS), chunk("scale2"), chunk("shift2"), f"{pre}.one2"),
                (f"{pre}.ffn.fc1",),
            )
        )
        plain += [f"{pre}.attn.proj", f"{pre}.ffn.fc2", ada]
        linear_groups[f"{pre}.attn.proj"] = first_vs_rest
        linear_groups[f"{pre}.ffn.fc2"] = first_vs_rest
        linear_groups[ada] = per_tensor
        matmuls += [f"{pre}.attn.matmul_qk", f"{pre}.attn.matmul_pv"]
        probs.append(f"{pre}.attn.matmul_pv")
    head_ada = "head_nm.ada_lin.1"
    # VAR includes its head in GPS (pitfall 2); the head's final input quantizer stays per-tensor
    sites.append(
        FoldSite(
            AdaLNRows(
                head_ada,
                len(HEAD_CHUNKS),
                HEAD_CHUNKS.index("scale"),
                HEAD_CHUNKS.index("shift"),
                "head_nm.one",
            ),
            ("head",),
            head=True,
        )
    )
    plain.append(head_ada)
    linear_groups[head_ada] = per_tensor
    return QuantLayout(
        fold_sites=tuple(sites),
        plain_linears=tuple(plain),
        matmuls=tuple(matmuls),
        prob_matmuls=tuple(probs),
        sink_positions=tuple(range(cfg.first_l)),  # the 1x1 scale
        position_groups=cfg.scale_of_position(),  # mat_qkv / fc1: one group per scale
        seq_len=cfg.seq_len,
        feature_module=f"blocks.{cfg.depth - 1}",
        linear_groups=linear_groups,
        official=OfficialCalibration(
            batch_size=64, ema=0.9, causal_mask=False, dgc_batch=32, exclude_last_class=True
        ),
        unmasked_forward=True,
    )


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The official `sample_with_top_k_top_p_` filtering: drop logits below the k-th largest, then
    (ascending sort) every token whose cumulative probability from the bottom is <= 1 - top_p, never
    the most likely one. top_p = 1 keeps everything top-k kept."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values.amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p > 0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop[..., -1:] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


SAMPLE_CHUNK = 1 << 22  # logits per sampling chunk of a scale (batch x tokens x vocab): 16 MiB in fp32


class DecodePlan(common.DecodePlan):
    """VAR's sampler on static buffers: one step is the whole multi-scale generation (every scale has
    a fixed shape), with the official linear CFG ramp and VAR's own top-k/top-p."""

    def __init__(self, model, batch: int, sampling: dict, compile: bool):
        cfg = model.config
        self.model, self.batch = model, batch
        self.cfg_scale = float(sampling["cfg_scale"])
        if sampling["more_smooth"]:
            raise ConfigError(
                "more_smooth=True mixes code vectors with Gumbel-softmax weights, which tokens cannot "
                "represent (the official code uses it for visualisation only); use more_smooth=False"
            )
        self.set_sampling(sampling, guided=self.cfg_scale != 0)
        dev = model.pos_1LC.device
        self.allocate(model.pos_1LC.dtype, dev)
        self.steps = 1
        table = model.attn_bias_for_masking[0, 0]
        self.scales = [
            (start, end, torch.arange(start, end, device=dev), table[start:end, :end].contiguous())
            for start, end in cfg.scale_bounds
        ]
        self.cond = torch.zeros(self.rows, cfg.embed_dim, dtype=model.pos_1LC.dtype, device=dev)
        vq = model.quantizer
        self.f_hat = vq.embedding.weight.new_zeros(batch, cfg.cvae, cfg.grid_size, cfg.grid_size)
        # ten scales of different lengths: the blocks compile once per scale with static shapes (every
        # block shares one scale's code), ten compiles per batch size: 42 s for VAR-d16 on an H100, where
        # dynamic lengths (three compiles) took ~300 s on an H200. The head (ten calls per image) stays eager.
        self.blocks = [common.compiled(block, compile) for block in model.blocks]
        self.head = self._head

    def reset(self, classes, seeds):
        rows = self.load_request(classes.to(self.cond.device), seeds)
        self.cond.copy_(self.model.class_emb(rows))

    def _head(self, x, pos, t: float, u):
        """Tokens (batch, N) of one scale. The guidance, filtering and draw run over chunks of about
        SAMPLE_CHUNK logits (all row-wise: the same tokens): over a whole late scale their fp32 copies, the
        sort's int64 order and the fp64 CDF were the peak of the generation (VAR-d16 batch 64: 64 x 256 x
        4096 logits, 0.5 GiB per fp64 or int64 copy)."""
        logits = self.model.head(self.model.head_nm(x, self.cond), pos)
        n, vocab = logits.shape[1], logits.shape[2]
        step = max(1, SAMPLE_CHUNK // (self.batch * vocab))
        return torch.cat(
            [self._sample(logits[:, i : i + step], t, u[:, i : i + step]) for i in range(0, n, step)], 1
        )

    def _sample(self, logits, t: float, u):
        logits = logits.float()
        if self.guided:
            b = self.batch
            logits = (1 + t) * logits[:b] - t * logits[b:]
        probs = filter_logits(logits / self.temperature, self.top_k, self.top_p).softmax(-1)
        return common.draw_from(probs, u)

    def step(self):
        m, cfg, vq = self.model, self.model.config, self.model.quantizer
        lvl_pos = m.lvl_pos()
        x = m.first_scale_input(self.cond, lvl_pos)
        self.f_hat.zero_()
        last = len(self.scales) - 1
        for si, (start, end, pos, bias) in enumerate(self.scales):
            for block in self.blocks:
                x = block(x, self.cond, pos, bias, True)
            idx = self.head(x, pos, self.cfg_scale * si / last, self.u[:, start:end])
            self.tokens[:, start:end] = idx
            if self.report is not None:  # step by step only (never inside a captured graph)
                self.report(end)
            if si != last:
                pn = cfg.patch_nums[si]
                h = vq.embedding(idx).transpose(1, 2).reshape(self.batch, cfg.cvae, pn, pn)
                _, nxt = vq.next_autoregressive_input(si, self.f_hat, h)
                x = m.scale_input(nxt.flatten(2).transpose(1, 2), end, lvl_pos)
                if self.guided:
                    x = x.repeat(2, 1, 1)


def build(config: VARConfig) -> VAR:
    return VAR(config)


def _check_tokenizer(model: VAR, tokenizer) -> None:
    tcfg = getattr(tokenizer, "config", None)
    if not hasattr(tokenizer, "quantize") or not hasattr(tcfg, "patch_nums"):
        raise ConfigError(f"VAR needs its multi-scale VQ-VAE tokenizer, got {type(tokenizer).__name__}")
    cfg = model.config
    theirs = (tuple(tcfg.patch_nums), tcfg.vocab_size, tcfg.cvae)
    ours = (tuple(cfg.patch_nums), cfg.vocab_size, cfg.cvae)
    if theirs != ours:
        raise ConfigError(
            f"tokenizer (patch_nums, vocab, Cvae) = {theirs} does not match the model's {ours}; "
            f"use the {cfg.tokenizer!r} tokenizer"
        )


def bind_tokenizer(model: VAR, tokenizer) -> None:
    """Give the model its VQ-VAE's quantizer (scale inputs are built from the codebook and phi)."""
    _check_tokenizer(model, tokenizer)
    model.bind_quantizer(tokenizer.quantize)


def decode_images(model: VAR, tokenizer, tokens: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, H, W, 3) for tokens (B, L) in generation (scale) order."""
    _check_tokenizer(model, tokenizer)
    return tokenizer.decode_tokens(tokens)
