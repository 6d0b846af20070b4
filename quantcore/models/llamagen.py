"""LlamaGen class-conditional GPT (and its PAR variant), in one file.

Architecture and parameter names follow the official LlamaGen `gpt.py` (and PAR's fork of it), so an
official checkpoint loads with a strict key check:

    cls_embedding.embedding_table.weight   (num_classes + 1, dim)   last row = null class for CFG
    tok_embeddings.weight                  (vocab, dim)
    layers.{i}.attention_norm.weight       RMSNorm
    layers.{i}.attention.wqkv.weight       fused q, k, v (no bias)
    layers.{i}.attention.wo.weight
    layers.{i}.ffn_norm.weight
    layers.{i}.feed_forward.w1/w2/w3.weight   SwiGLU: w2(silu(w1 x) * w3 x)
    norm.weight, output.weight
    spe_tok_embeddings.special_embeddings.weight   (PAR only)

Sequence layout (one class token in front, `cls_token_num` = 1):
- raster order: [cls, t0, t1, ..., t_{L-2}] -> logits for t0 .. t_{L-1};
- PAR order (Parallelized AR): the grid is split into `r` regions (4 = 2x2 or 16 = 4x4); tokens are
  generated in region-interleaved order (intra-region raster index major, region minor). The first `r`
  tokens are generated one at a time, then `r - 1` learned special tokens are inserted and from then on
  `r` tokens (one per region) are predicted per step by a group of `r` positions that see each other:
  [cls, t0 .. t_{r-1}, S1 .. S_{r-1}, t_r, ...]. The class and special positions get an all-zero RoPE
  table, as in the official code, so their q and k are exactly zero (a LlamaGen quirk we keep).

Attention is written out with two `MatMul` modules and every projection is a `quantcore.nn.Linear`
that receives the absolute token positions, so quantized modules can replace them one for one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from quantcore.errors import ConfigError
from quantcore.models import common
from quantcore.models.common import ModelEntry
from quantcore.nn import (
    Linear,
    MatMul,
    allocate_kv_caches,
    free_kv_caches,
    fused_attention,
    read_kv,
    write_kv,
)
from quantcore.quant.layout import FoldSite, OfficialCalibration, QuantLayout


def _round_up(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


@dataclass(frozen=True)
class LlamaGenConfig:
    dim: int
    n_layer: int
    n_head: int
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    num_classes: int = 1000
    vocab_size: int = 16384
    grid_size: int = 16  # latent tokens per side: 16 at 256 px, 24 at 384 px (VQ-16 downsamples by 16)
    par_regions: int = 0  # 0 = raster order; 4 or 16 = PAR with that many regions
    tokenizer: str = "VQ-16"

    def __post_init__(self) -> None:
        if self.dim % self.n_head:
            raise ConfigError(f"dim {self.dim} must be divisible by n_head {self.n_head}")
        if (self.dim // self.n_head) % 4:
            raise ConfigError(f"head_dim {self.dim // self.n_head} must be divisible by 4 for the 2D RoPE")
        if self.par_regions:
            side = math.isqrt(self.par_regions)
            if side * side != self.par_regions or self.par_regions < 4 or self.grid_size % side:
                raise ConfigError(
                    f"par_regions {self.par_regions} must be a square >= 4 whose side divides grid_size "
                    f"{self.grid_size}"
                )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return _round_up(hidden, self.multiple_of)

    @property
    def num_tokens(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def special_tokens(self) -> int:
        return self.par_regions - 1 if self.par_regions else 0

    @property
    def seq_len(self) -> int:
        """Input positions of a full sequence: the last token is never an input, the class token is."""
        return self.num_tokens

    def to_dict(self) -> dict:
        return asdict(self)


# Sizes of the official models (LlamaGen `GPT_models`; PAR uses the same transformer sizes).
SIZES = {
    "B": dict(dim=768, n_layer=12, n_head=12),
    "L": dict(dim=1024, n_layer=24, n_head=16),
    "XL": dict(dim=1280, n_layer=36, n_head=20),
    "XXL": dict(dim=1536, n_layer=48, n_head=24),
    "3B": dict(dim=3200, n_layer=24, n_head=32),
}


@dataclass(frozen=True)
class SamplingDefaults:
    cfg_scale: float
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_interval: int = -1  # apply CFG for the first N steps only; -1 = every step

    def to_dict(self) -> dict:
        return asdict(self)


def _entries() -> dict[str, ModelEntry]:
    vq = ("vq_ds16_c2i.pt",)
    # LlamaGen README evaluation settings: CFG 2.0 for B/L, 1.75 for XL/XXL, 1.65 for 3B; top-k 0, top-p 1.
    llamagen = {
        "llamagen-b": ("B", 16, 2.0, ("c2i_B_256.pt",)),
        "llamagen-b-384": ("B", 24, 2.0, ("c2i_B_384.pt",)),
        "llamagen-l": ("L", 16, 2.0, ("c2i_L_256.pt",)),
        "llamagen-l-384": ("L", 24, 2.0, ("c2i_L_384.pt",)),
        "llamagen-xl": ("XL", 24, 1.75, ("c2i_XL_384.pt",)),
        "llamagen-xxl": ("XXL", 24, 1.75, ("c2i_XXL_384.pt",)),
        "llamagen-3b": ("3B", 24, 1.65, ("c2i_3B_384.pt",)),
    }
    # PAR: 384 px, region-parallel decoding; CFG per the PTQ4ARVG scripts (reference §2.3).
    par = {
        "par-xl-4x": ("XL", 4, 1.5, ("PAR-XL-4x.pt",)),
        "par-xxl-4x": ("XXL", 4, 1.435, ("PAR-XXL-4x.pt",)),
        "par-3b-4x": ("3B", 4, 1.345, ("PAR-3B-4x.pt",)),
        "par-3b-16x": ("3B", 16, 1.5, ("PAR-3B-16x.pt",)),
    }
    entries = {}
    for name, (size, grid, cfg, files) in llamagen.items():
        entries[name] = ModelEntry(
            name, LlamaGenConfig(**SIZES[size], grid_size=grid), SamplingDefaults(cfg), files + vq
        )
    for name, (size, regions, cfg, files) in par.items():
        entries[name] = ModelEntry(
            name,
            LlamaGenConfig(**SIZES[size], grid_size=24, par_regions=regions),
            SamplingDefaults(cfg),
            files + vq,
            notes="generates at 384 px; the paper's evaluation resizes to 256 px (bicubic)",
        )
    # Tiny configs exercising every code path in milliseconds (random weights, for tests).
    tiny = dict(
        dim=64, n_layer=2, n_head=4, multiple_of=32, num_classes=10, vocab_size=64, tokenizer="VQ-tiny"
    )
    entries["llamagen-tiny"] = ModelEntry(
        "llamagen-tiny", LlamaGenConfig(**tiny, grid_size=4), SamplingDefaults(2.0), tags=("test",)
    )
    entries["par-tiny"] = ModelEntry(
        "par-tiny", LlamaGenConfig(**tiny, grid_size=4, par_regions=4), SamplingDefaults(2.0), tags=("test",)
    )
    return entries


MODELS: dict[str, ModelEntry] = _entries()


# ---------------------------------------------------------------------------------------------------
# Sequence layout: generation order, RoPE tables and attention masks
# ---------------------------------------------------------------------------------------------------


def generation_order(config: LlamaGenConfig) -> torch.Tensor:
    """raster index of the k-th generated token (identity for raster order)."""
    g = config.grid_size
    if not config.par_regions:
        return torch.arange(g * g)
    side = math.isqrt(config.par_regions)
    sub = g // side
    # index (row_in_region, col_in_region, region_row, region_col) -> raster index
    rr, rc, gr, gc = torch.meshgrid(
        torch.arange(sub), torch.arange(sub), torch.arange(side), torch.arange(side), indexing="ij"
    )
    return ((gr * sub + rr) * g + (gc * sub + rc)).flatten()


def token_positions(config: LlamaGenConfig) -> torch.Tensor:
    """sequence position of the input slot that holds the k-th generated token."""
    k = torch.arange(config.num_tokens)
    # t_k sits at 1 + k, shifted by the special tokens once past the first `regions` tokens
    return 1 + k + torch.where(k >= config.par_regions, config.special_tokens, 0) * (config.par_regions > 0)


def rope_table(config: LlamaGenConfig) -> torch.Tensor:
    """(seq_len, head_dim // 2, 2) cos/sin per sequence position; zeros at cls and special slots."""
    g, half = config.grid_size, config.head_dim // 2
    freqs = 1.0 / (config.rope_base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    angles = torch.outer(torch.arange(g).float(), freqs)  # (g, head_dim // 4)
    grid = torch.cat(
        [angles[:, None, :].expand(-1, g, -1), angles[None, :, :].expand(g, -1, -1)], dim=-1
    )  # (g, g, head_dim // 2): first half rotates with the row, second with the column
    per_raster = torch.stack([grid.cos(), grid.sin()], dim=-1).flatten(0, 1)
    table = torch.zeros(config.seq_len, half, 2)
    slots = token_positions(config)
    keep = slots < table.shape[0]
    table[slots[keep]] = per_raster[generation_order(config)[keep]]
    return table


def attention_mask(config: LlamaGenConfig) -> torch.Tensor:
    """(S, S) bool, True = may attend. Causal; PAR adds full visibility inside each parallel group."""
    size = config.seq_len
    mask = torch.ones(size, size, dtype=torch.bool).tril()
    if config.par_regions:
        r = config.par_regions
        for start in range(r, size, r):  # groups [r, 2r), [2r, 3r), ... of r positions each
            mask[start : start + r, : start + r] = True
    return mask


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, D) pairs of channels by the per-position angles of `table` (T, D // 2, 2)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    out = torch.stack(
        [pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin], dim=-1
    )
    return out.flatten(3).type_as(x)


# ---------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm; `bias` stays None for official weights and becomes a tensor once a shift is folded in."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("bias", None)  # a None buffer is left out of the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight
        return out if self.bias is None else out + self.bias


class Attention(nn.Module):
    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.wqkv = Linear(config.dim, (config.n_head + 2 * config.kv_heads) * config.head_dim, bias=False)
        self.wo = Linear(config.dim, config.dim, bias=False)
        self.matmul_qk = MatMul()
        self.matmul_pv = MatMul()
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)
        self.kv_codec = None  # 8-bit cache storage (quantcore.quant.real.KVCodec), set by to_real
        self.fused_attention = None  # one kernel over the cache (quantcore.quant.real.FusedAttention)
        self.causal = not config.par_regions  # PAR's groups see each other: its masks are not causal

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor, use_cache: bool
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x, pos).split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rope(q.view(b, t, self.n_head, self.head_dim), rope).transpose(1, 2)
        k = apply_rope(k.view(b, t, self.n_kv_head, self.head_dim), rope).transpose(1, 2)
        v = v.view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        if use_cache:
            write_kv(self, b, pos, k, v)
            if self.fused_attention is not None and self.causal:
                out = fused_attention(self, q, b, pos, mask.shape[-1], True, 1 / math.sqrt(self.head_dim))
                return self.wo(out.transpose(1, 2).reshape(b, t, -1), pos)
            k, v = read_kv(self, b, mask.shape[-1], q.dtype)
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        scores = self.matmul_qk(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).type_as(q)
        out = self.matmul_pv(probs, v).transpose(1, 2).reshape(b, t, -1)
        return self.wo(out, pos)


class FeedForward(nn.Module):
    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.w1 = Linear(config.dim, config.ffn_hidden, bias=False)
        self.w3 = Linear(config.dim, config.ffn_hidden, bias=False)
        self.w2 = Linear(config.ffn_hidden, config.dim, bias=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x, pos)) * self.w3(x, pos), pos)


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, pos, rope, mask, use_cache):
        h = x + self.attention(self.attention_norm(x), pos, rope, mask, use_cache)
        return h + self.feed_forward(self.ffn_norm(h), pos)


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)  # + the null class used for CFG


class SpecialTokenEmbedding(nn.Module):
    def __init__(self, count: int, dim: int):
        super().__init__()
        self.special_embeddings = nn.Embedding(count, dim)


class LlamaGen(nn.Module):
    family = "llamagen"

    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.config = config
        self.cls_embedding = LabelEmbedder(config.num_classes, config.dim)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        if config.par_regions:
            self.spe_tok_embeddings = SpecialTokenEmbedding(config.special_tokens, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = Linear(config.dim, config.vocab_size, bias=False)
        with torch.device("cpu"):  # layout tables are real even when the model is built on "meta"
            self.register_buffer("rope", rope_table(config), persistent=False)
            self.register_buffer("mask", attention_mask(config), persistent=False)
            self.register_buffer("token_slots", token_positions(config), persistent=False)
            self.register_buffer("order", generation_order(config), persistent=False)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    # -- inputs ------------------------------------------------------------------------------------

    def embed_sequence(self, classes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced input (B, L, dim) for class ids (B,) and tokens (B, L) in generation order."""
        cfg = self.config
        parts = [self.cls_embedding.embedding_table(classes)[:, None], self.tok_embeddings(tokens)]
        if cfg.par_regions:
            r, tok = cfg.par_regions, parts[1]
            special = self.spe_tok_embeddings.special_embeddings.weight
            parts[1:] = [tok[:, :r], special[None].expand(tok.shape[0], -1, -1), tok[:, r:]]
        return torch.cat(parts, dim=1)[:, : cfg.seq_len]

    def setup_caches(self, batch_size: int, dtype: torch.dtype | None = None) -> None:
        cfg = self.config
        dtype = dtype or self.tok_embeddings.weight.dtype
        shape = (batch_size, cfg.kv_heads, cfg.seq_len, cfg.head_dim)
        allocate_kv_caches([layer.attention for layer in self.layers], shape, dtype, self.rope.device)

    def clear_caches(self) -> None:
        free_kv_caches([layer.attention for layer in self.layers])

    # -- the transformer -------------------------------------------------------------------------------

    def forward(self, h: torch.Tensor, pos: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) for input embeddings `h` (B, T, dim) at absolute positions `pos` (T,).

        Without the cache the T positions attend to each other only (a full teacher-forced sequence
        when pos = 0..T-1); with it they attend to everything cached up to the last position.
        """
        rope = self.rope[pos]
        if use_cache:
            mask = self.mask[pos][:, : int(pos.max()) + 1]
        else:
            mask = self.mask[pos][:, pos]
        for layer in self.layers:
            h = layer(h, pos, rope, mask, use_cache)
        return self.output(self.norm(h), pos).float()

    def sequence_logits(self, classes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, L, vocab); row k predicts the k-th generated token."""
        h = self.embed_sequence(classes, tokens)
        return self(h, torch.arange(h.shape[1], device=h.device))


# ---------------------------------------------------------------------------------------------------
# Quantization layout (reference §4, PAR row; plain LlamaGen treats its class token as the sink)
# ---------------------------------------------------------------------------------------------------


def quant_layout(model: LlamaGen) -> QuantLayout:
    cfg = model.config
    sites, plain, matmuls, probs = [], [], [], []
    for i in range(cfg.n_layer):
        pre = f"layers.{i}"
        sites.append(FoldSite(f"{pre}.attention_norm", (f"{pre}.attention.wqkv",)))
        # w1 and w3 share the input and one scale; w1 drives the statistics, as in the official code
        sites.append(FoldSite(f"{pre}.ffn_norm", (f"{pre}.feed_forward.w1", f"{pre}.feed_forward.w3")))
        plain += [f"{pre}.attention.wo", f"{pre}.feed_forward.w2"]
        matmuls += [f"{pre}.attention.matmul_qk", f"{pre}.attention.matmul_pv"]
        probs.append(f"{pre}.attention.matmul_pv")
    sites.append(FoldSite("norm", ("output",), head=True))
    r = cfg.par_regions
    groups = torch.zeros(cfg.seq_len, dtype=torch.long)
    if r:
        # PAR: class token and the first r - 1 AR tokens alone, the first parallel group shared,
        # the rest shared: r + 2 groups, and 2r sink positions (8 for the 4x models)
        groups[:r] = torch.arange(r)
        groups[r : 2 * r] = r
        groups[2 * r :] = r + 1
        sinks = tuple(range(2 * r))
    else:
        groups[1:] = 1  # the class token (q = k = 0 under the zero RoPE) and the rest
        sinks = (0,)
    return QuantLayout(
        fold_sites=tuple(sites),
        plain_linears=tuple(plain),
        matmuls=tuple(matmuls),
        prob_matmuls=tuple(probs),
        sink_positions=sinks,
        position_groups=groups,
        seq_len=cfg.seq_len,
        log_sqrt2_probs=bool(r),
        feature_module=f"layers.{cfg.n_layer - 1}",
        # the official code quantizes PAR only; plain LlamaGen follows it
        official=OfficialCalibration(batch_size=64, ema=0.9, dgc_batch=32),
    )


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------


class DecodePlan(common.DecodePlan):
    """LlamaGen's sampler on static buffers: the official CFG (and its interval), temperature, top-k/p.

    Raster: every step feeds one input slot and draws one token with the same shapes (the class token
    first), so one CUDA graph is replayed num_tokens times. PAR: the first r steps feed one slot each,
    then r slots per step (t_{r-1} with the r-1 special tokens once); the width changes, so PAR runs
    step by step (`capturable = False`).
    """

    def __init__(self, model: LlamaGen, batch: int, sampling: dict, compile: bool):
        cfg = model.config
        self.model, self.batch = model, batch
        self.cfg_scale = float(sampling["cfg_scale"])
        self.cfg_interval = int(sampling["cfg_interval"])
        self.set_sampling(sampling, guided=self.cfg_scale > 1.0)
        dev, dtype = model.rope.device, model.tok_embeddings.weight.dtype
        self.allocate(dtype, dev)
        self.blocks = [common.compiled(layer, compile) for layer in model.layers]
        self.head = common.compiled(self._head, compile)
        self.cond = torch.zeros(self.rows, dtype=torch.long, device=dev)
        self.capturable = not cfg.par_regions
        if self.capturable:
            self.steps = cfg.num_tokens
            self.pos = torch.zeros(1, dtype=torch.long, device=dev)
            self.h = torch.zeros(self.rows, 1, cfg.dim, dtype=dtype, device=dev)
        else:
            self.schedule, produced = [], 0  # (tokens produced before the step, its input slots)
            while produced < cfg.num_tokens:
                pos = _next_inputs(cfg, model.token_slots, produced).to(dev)
                self.schedule.append((produced, pos))
                produced += pos.numel()
            self.steps = len(self.schedule)
            self.guidance = [
                torch.tensor(par_guidance_on(step, cfg.par_regions, self.cfg_interval), device=dev)
                for step in range(self.steps)
            ]

    def reset(self, classes, seeds):
        m = self.model
        self.cond.copy_(self.load_request(classes, seeds))
        self.index = 0
        if self.capturable:
            self.h.copy_(m.cls_embedding.embedding_table(self.cond)[:, None])
            self.pos.zero_()

    def _head(self, h, pos, guidance_on):
        m = self.model
        logits = m.output(m.norm(h), pos).float()
        if self.guided:
            guided = common.guide(logits, self.cfg_scale)
            if self.cfg_interval >= 0:
                guided = torch.where(guidance_on, guided, logits.chunk(2)[0])
            logits = guided
        return common.filter_logits(logits / self.temperature, self.top_k, self.top_p).softmax(-1)

    def _blocks(self, h, pos):
        rope, mask = self.model.rope[pos], self.model.mask[pos]
        for block in self.blocks:
            h = block(h, pos, rope, mask, True)
        return h

    def step(self):
        if not self.capturable:
            return self._par_step()
        m, pos = self.model, self.pos
        # the official sampler keeps CFG through decode step k counted after the prefill: token k + 1
        tok = common.draw_from(
            self.head(self._blocks(self.h, pos), pos, pos <= self.cfg_interval + 1),
            self.u.index_select(1, pos),
        )
        self.tokens.index_copy_(1, pos, tok)
        self.h.copy_(m.tok_embeddings(torch.cat([tok, tok]) if self.guided else tok))
        pos.add_(1)

    def _par_step(self):
        cfg, m = self.model.config, self.model
        produced, pos = self.schedule[self.index]
        n = pos.numel()  # every input slot of a step predicts one new token
        toks = torch.cat([self.tokens, self.tokens]) if self.guided else self.tokens
        if produced == 0:
            h = m.cls_embedding.embedding_table(self.cond)[:, None]
        elif produced == cfg.par_regions:
            special = m.spe_tok_embeddings.special_embeddings.weight
            last = m.tok_embeddings(toks[:, produced - 1 : produced])
            h = torch.cat([last, special[None].expand(toks.shape[0], -1, -1)], dim=1)
        else:
            h = m.tok_embeddings(toks[:, produced - n : produced])
        probs = self.head(self._blocks(h, pos)[:, -n:], pos[-n:], self.guidance[self.index])
        self.tokens[:, produced : produced + n] = common.draw_from(probs, self.u[:, produced : produced + n])
        self.index += 1

    def tokens_after(self, step: int) -> int:
        if self.capturable:
            return step + 1
        produced, pos = self.schedule[step]
        return produced + pos.numel()


def par_guidance_on(step: int, regions: int, cfg_interval: int) -> bool:
    """Whether PAR's decoding step `step` (0 = the class token) is guided, as the official sampler counts:
    the prefill always; the r - 1 AR steps while their index from 0 is <= cfg_interval; then the counter
    restarts at the parallel phase and counts tokens in steps of r, so that phase's first step is guided
    again whenever cfg_interval >= 0 (-1: every step)."""
    if cfg_interval < 0 or step == 0:
        return True
    if step < regions:
        return step - 1 <= cfg_interval
    return (step - regions) * regions <= cfg_interval


def _next_inputs(cfg: LlamaGenConfig, slots: torch.Tensor, produced: int) -> torch.Tensor:
    """Input positions of the decoding step that follows `produced` tokens."""
    r = cfg.par_regions
    if produced == 0:
        return torch.tensor([0])  # the class token
    if r and produced == r:
        return torch.arange(int(slots[r - 1]), int(slots[r]))  # t_{r-1} and the r-1 special tokens
    width = r if r and produced > r else 1
    return slots[produced - width : produced].cpu()


def to_raster(model: LlamaGen, tokens: torch.Tensor) -> torch.Tensor:
    """Reorder tokens from generation order to the tokenizer's raster order."""
    raster = torch.empty_like(tokens)
    raster[:, model.order.to(tokens.device)] = tokens
    return raster


def build(config: LlamaGenConfig) -> LlamaGen:
    return LlamaGen(config)


def decode_images(model: LlamaGen, tokenizer, tokens: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, H, W, 3) for tokens in generation order."""
    grid = model.config.grid_size
    return tokenizer.decode_tokens(to_raster(model, tokens), grid=(grid, grid))
