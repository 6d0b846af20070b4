"""RAR (Randomized AutoRegressive visual generation), class-conditional, in one file.

Architecture and parameter names follow the official `RAR/modeling/rar.py`, so `rar_{b,l,xl,xxl}.bin`
loads with a strict key check:

    cls_token                          (1, 1, dim)          learned token at position 0
    embeddings.weight                  (1024 + 1 + 1000 + 1, dim)   image tokens, mask id, classes, null class
    pos_embed                          (1, 256 + 1024, dim) added at every position
    target_aware_pos_embed             (1, 256 + 1024, dim) the embedding of the position being predicted
    timesteps_embeddings               (1, 256 + 100, dim)  per-position part of the AdaLN condition
    blocks.{i}.norm1 / norm2           LayerNorm (affine, eps 1e-6)
    blocks.{i}.attn.qkv                Linear(dim, 3 dim, bias) with qk-norm: attn.q_norm, attn.k_norm
    blocks.{i}.attn.proj, blocks.{i}.mlp.fc1 / fc2 (exact GELU)
    blocks.{i}.adaLN_modulation.1      Linear(dim, 6 dim): shift_msa, scale_msa, gate_msa, shift_mlp,
                                       scale_mlp, gate_mlp
    adaln_before_head.adaLN_modulation.1   Linear(dim, 2 dim): scale, shift (LayerNorm without affine)
    lm_head                            Linear(dim, 1024, bias)

Sequence layout (prefix 2), in raster order, as the official sampler generates (RAR's random orders
only matter in training):

    position   0      1        2     3          ...  256
    input      cls    class    t0    t1         ...  t254
    predicts   -      t0       t1    t2         ...  t255

Every position gets pos_embed[p]; position p >= 1 also gets the target-aware embedding of the image
position it predicts (official table row p + 1, the image part of the table starting at row 2). The
AdaLN condition is per position: c_p = E[class id] + timesteps_embeddings[p]. The final layer runs on
positions >= 1 only (the official full pass drops the cls position before it), so its per-position
quantizer tables are indexed by absolute position 1.. and never see position 0.

Attention is written out with two `MatMul` modules and every projection is a `quantcore.nn.Linear` that
receives the absolute token positions; the "1 +" of the AdaLN modulation is a buffer (`one_msa`,
`one_mlp`, `one`) that stays None (the constant 1) until a scale is folded into the AdaLN rows.
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

PREFIX = 2  # cls token and class token in front of the image tokens


@dataclass(frozen=True)
class RARConfig:
    dim: int
    n_layer: int
    mlp_dim: int
    n_head: int = 16
    norm_eps: float = 1e-6
    num_classes: int = 1000
    codebook_size: int = 1024
    grid_size: int = 16  # 16 x 16 tokens at 256 px (the MaskGIT VQGAN downsamples by 16)
    # The official tables have spare rows beyond what sampling reads (image_seq_len + 1024 position
    # rows, image_seq_len + 100 timestep rows); they are in the checkpoint, so they are here.
    spare_pos_rows: int = 1024
    spare_timestep_rows: int = 100
    tokenizer: str = "MaskGIT-VQGAN"

    def __post_init__(self) -> None:
        if self.dim % self.n_head:
            raise ConfigError(f"dim {self.dim} must be divisible by n_head {self.n_head}")
        if self.spare_pos_rows < PREFIX or self.spare_timestep_rows < 1:
            raise ConfigError(
                f"spare_pos_rows must be >= {PREFIX} and spare_timestep_rows >= 1 so every position has a row"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def num_tokens(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def vocab_size(self) -> int:
        """Rows of the shared embedding table: image tokens, the (unused) mask id, classes, null class."""
        return self.codebook_size + 1 + self.num_classes + 1

    @property
    def seq_len(self) -> int:
        """Input positions of a full sequence: cls, class and every token but the last."""
        return PREFIX + self.num_tokens - 1

    def to_dict(self) -> dict:
        return asdict(self)


# Sizes of the official models (every RAR script; 16 heads for all).
SIZES = {
    "B": dict(dim=768, n_layer=24, mlp_dim=3072),
    "L": dict(dim=1024, n_layer=24, mlp_dim=4096),
    "XL": dict(dim=1280, n_layer=32, mlp_dim=5120),
    "XXL": dict(dim=1408, n_layer=40, mlp_dim=6144),
}


@dataclass(frozen=True)
class SamplingDefaults:
    cfg_scale: float  # official `guidance_scale`; 0 turns CFG off (as in the official sampler)
    cfg_pow: float  # official `guidance_scale_pow`, the exponent of the cosine CFG ramp
    temperature: float = 1.0  # official `randomize_temperature`
    top_k: int = 0  # the official sampler does no top-k / top-p; 0 and 1.0 leave the logits alone
    top_p: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


def _entries() -> dict[str, ModelEntry]:
    tokenizer = ("maskgit-vqgan-imagenet-f16-256.bin",)
    # Per-size sampling settings of the official scripts (sample_rar.py).
    official = {
        "rar-b": ("B", 16.0, 2.75, 1.0, "rar_b.bin"),
        "rar-l": ("L", 15.5, 2.5, 1.02, "rar_l.bin"),
        "rar-xl": ("XL", 6.9, 1.5, 1.02, "rar_xl.bin"),
        "rar-xxl": ("XXL", 8.0, 1.2, 1.02, "rar_xxl.bin"),
    }
    entries = {
        name: ModelEntry(name, RARConfig(**SIZES[size]), SamplingDefaults(g, p, t), (file,) + tokenizer)
        for name, (size, g, p, t, file) in official.items()
    }
    # Every code path in milliseconds (random weights, for tests).
    tiny = RARConfig(
        dim=64,
        n_layer=2,
        mlp_dim=128,
        n_head=4,
        num_classes=10,
        codebook_size=64,
        grid_size=4,
        spare_pos_rows=4,
        spare_timestep_rows=2,
        tokenizer="MaskGIT-tiny",
    )
    entries["rar-tiny"] = ModelEntry("rar-tiny", tiny, SamplingDefaults(4.0, 1.5), tags=("test",))
    return entries


MODELS: dict[str, ModelEntry] = _entries()


def _ada(modulation: nn.Sequential, c: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Sequential(SiLU, Linear), called by hand so the linear receives the positions."""
    return modulation[1](modulation[0](c), pos)


# ---------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, config: RARConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.qkv = Linear(config.dim, 3 * config.dim, bias=True)
        self.q_norm = nn.LayerNorm(config.head_dim, eps=config.norm_eps)
        self.k_norm = nn.LayerNorm(config.head_dim, eps=config.norm_eps)
        self.proj = Linear(config.dim, config.dim)
        self.matmul_qk = MatMul()
        self.matmul_pv = MatMul()
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)
        self.kv_codec = None  # 8-bit cache storage (quantcore.quant.real.KVCodec), set by to_real
        self.fused_attention = None  # one kernel over the cache (quantcore.quant.real.FusedAttention)

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, use_cache: bool
    ) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x, pos).view(b, t, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if use_cache:
            write_kv(self, b, pos, k, v)
            if self.fused_attention is not None:  # the mask is causal
                out = fused_attention(self, q, b, pos, mask.shape[-1], True, 1 / math.sqrt(self.head_dim))
                return self.proj(out.transpose(1, 2).reshape(b, t, d), pos)
            k, v = read_kv(self, b, mask.shape[-1], q.dtype)
        scores = self.matmul_qk(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        out = self.matmul_pv(probs, v).transpose(1, 2).reshape(b, t, d)
        return self.proj(out, pos)


class Mlp(nn.Module):
    def __init__(self, config: RARConfig):
        super().__init__()
        self.fc1 = Linear(config.dim, config.mlp_dim)
        self.fc2 = Linear(config.mlp_dim, config.dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x, pos)), pos)


class Block(nn.Module):
    def __init__(self, config: RARConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.mlp = Mlp(config)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(config.dim, 6 * config.dim))
        self.register_buffer("one_msa", None)  # None = 1; folding makes them 1/s (saved in artifacts)
        self.register_buffer("one_mlp", None)

    def forward(self, x, c, pos, mask, use_cache):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _ada(
            self.adaLN_modulation, c, pos
        ).chunk(6, dim=-1)
        h = modulate(self.norm1(x), self.one_msa, scale_msa, shift_msa)
        x = x + gate_msa * self.attn(h, pos, mask, use_cache)
        h = modulate(self.norm2(x), self.one_mlp, scale_mlp, shift_mlp)
        return x + gate_mlp * self.mlp(h, pos)


class FinalLayer(nn.Module):
    def __init__(self, config: RARConfig):
        super().__init__()
        self.norm_final = nn.LayerNorm(config.dim, eps=config.norm_eps, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(config.dim, 2 * config.dim))
        self.register_buffer("one", None)

    def forward(self, x: torch.Tensor, c: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        scale, shift = _ada(self.adaLN_modulation, c, pos).chunk(2, dim=-1)
        return modulate(self.norm_final(x), self.one, scale, shift)


class RAR(nn.Module):
    family = "rar"

    def __init__(self, config: RARConfig):
        super().__init__()
        self.config = config
        d, n = config.dim, config.num_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.embeddings = nn.Embedding(config.vocab_size, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, n + config.spare_pos_rows, d))
        self.target_aware_pos_embed = nn.Parameter(torch.zeros(1, n + config.spare_pos_rows, d))
        self.timesteps_embeddings = nn.Parameter(torch.zeros(1, n + config.spare_timestep_rows, d))
        self.adaln_before_head = FinalLayer(config)
        self.lm_head = Linear(d, config.codebook_size)
        with torch.device("cpu"):  # the mask is real even when the model is built on "meta"
            mask = torch.ones(config.seq_len, config.seq_len, dtype=torch.bool).tril()
            self.register_buffer("attn_mask", mask, persistent=False)

    @property
    def null_class(self) -> int:
        return self.config.num_classes  # embedding id num_classes + codebook_size + 1 (2025 officially)

    # -- inputs ------------------------------------------------------------------------------------

    def embed(
        self, classes: torch.Tensor, tokens: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs x and AdaLN conditions c, both (B, T, dim), at absolute positions `pos` (T,).

        `classes` (B,) are class ids (null_class for the uncond half); `tokens` (B, n) are the image
        tokens known so far: position p >= 2 holds tokens[:, p - 2].
        """
        class_ids = classes + self.config.codebook_size + 1
        ids = torch.cat([class_ids[:, None], tokens], dim=1)  # sequence positions 1, 2, ...
        x = self.embeddings(ids[:, (pos - 1).clamp(min=0)])
        x = torch.where((pos == 0)[None, :, None], self.cls_token, x)
        # position p >= 1 predicts image position p - 1, whose target-aware row is 2 + (p - 1)
        target = self.target_aware_pos_embed[0, pos + 1]
        x = x + self.pos_embed[0, pos] + torch.where((pos > 0)[:, None], target, torch.zeros_like(target))
        c = self.embeddings(class_ids)[:, None] + self.timesteps_embeddings[0, pos]
        return x, c

    def setup_caches(self, batch_size: int, dtype: torch.dtype | None = None) -> None:
        cfg = self.config
        dtype = dtype or self.embeddings.weight.dtype
        shape = (batch_size, cfg.n_head, cfg.seq_len, cfg.head_dim)
        allocate_kv_caches([block.attn for block in self.blocks], shape, dtype, self.embeddings.weight.device)

    def clear_caches(self) -> None:
        free_kv_caches([block.attn for block in self.blocks])

    # -- the transformer -----------------------------------------------------------------------------

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, pos: torch.Tensor, use_cache: bool = False
    ) -> torch.Tensor:
        """Logits (B, T', vocab) of the positions in `pos` that predict a token (all but position 0).

        Without the cache the T positions attend to each other only (a teacher-forced sequence when
        pos = 0..T-1); with it they attend to everything cached up to the last position.
        """
        mask = self.attn_mask.to(x.device)[pos]
        mask = mask[:, : int(pos.max()) + 1] if use_cache else mask[:, pos]
        for block in self.blocks:
            x = block(x, c, pos, mask, use_cache)
        keep = pos > 0
        x, c, pos = x[:, keep], c[:, keep], pos[keep]
        logits = self.lm_head(self.adaln_before_head(x, c, pos), pos)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))  # sample in >= fp32

    def sequence_logits(self, classes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, L, vocab) for tokens (B, L); row k predicts token k."""
        pos = torch.arange(PREFIX + tokens.shape[1] - 1, device=tokens.device)
        x, c = self.embed(classes, tokens, pos)
        return self(x, c, pos)


def build(config: RARConfig) -> RAR:
    return RAR(config)


# ---------------------------------------------------------------------------------------------------
# Quantization layout (reference §4, RAR row)
# ---------------------------------------------------------------------------------------------------


def quant_layout(model: RAR) -> QuantLayout:
    cfg = model.config
    positions = torch.arange(cfg.seq_len)
    sites, plain, matmuls, per_position = [], [], [], {}
    for i in range(cfg.n_layer):
        pre = f"blocks.{i}"
        ada = f"{pre}.adaLN_modulation.1"
        # RAR's modulate is x * (1 + scale) + shift: qkv reads chunks (scale 1, shift 0), fc1 (4, 3)
        sites.append(
            FoldSite(AdaLNRows(ada, 6, scale=1, shift=0, one=f"{pre}.one_msa"), (f"{pre}.attn.qkv",))
        )
        sites.append(FoldSite(AdaLNRows(ada, 6, scale=4, shift=3, one=f"{pre}.one_mlp"), (f"{pre}.mlp.fc1",)))
        plain += [f"{pre}.attn.proj", f"{pre}.mlp.fc2", ada]
        matmuls += [f"{pre}.attn.matmul_qk", f"{pre}.attn.matmul_pv"]
        # the AdaLN input SiLU(E[class] + timesteps[p]) differs per position: one table row each
        per_position[ada] = positions
    final = "adaln_before_head.adaLN_modulation.1"
    # RAR keeps GPS off its head (SmoothQuant + shift only); the head's input stays per-tensor
    sites.append(
        FoldSite(
            AdaLNRows(final, 2, scale=0, shift=1, one="adaln_before_head.one"),
            ("lm_head",),
            gps=False,
            head=True,
        )
    )
    plain.append(final)
    # The final layer sees positions 1.. only. Indexed by absolute position, position p gets row p - 1,
    # so the 2-token prefill uses the class token's row, not the cls row the official table shifts in
    # (reference pitfall 9); position 0 borrows row 0 to keep the table total, and is never looked up.
    per_position[final] = (positions - 1).clamp(min=0)
    groups = torch.full((cfg.seq_len,), 2, dtype=torch.long)
    groups[:PREFIX] = torch.arange(PREFIX)  # cls, class token, then every image position shared
    return QuantLayout(
        fold_sites=tuple(sites),
        plain_linears=tuple(plain),
        matmuls=tuple(matmuls),
        prob_matmuls=tuple(name for name in matmuls if name.endswith("matmul_pv")),
        sink_positions=tuple(range(PREFIX)),
        position_groups=groups,
        seq_len=cfg.seq_len,
        feature_module=f"blocks.{cfg.n_layer - 1}",
        linear_groups=per_position,
        per_position_groups={final: per_position[final]},
        official=OfficialCalibration(
            include_zero=True, recalibrate_all=False, head_second_shift=True, exclude_last_class=True
        ),
    )


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------


def cfg_schedule(step: int, num_tokens: int, cfg_scale: float, cfg_pow: float) -> float:
    """The official cosine ramp from 1 (first token) towards cfg_scale (last token)."""
    return (cfg_scale - 1.0) * (1.0 - math.cos(math.pi * (step / num_tokens) ** cfg_pow)) / 2.0 + 1.0


class DecodePlan(common.DecodePlan):
    """RAR's sampler on static buffers: the (cls, class) prefix runs once, then one graph-replayable
    step per token, with the official cosine CFG ramp."""

    prologue_tokens = 1

    def __init__(self, model, batch: int, sampling: dict, compile: bool):
        cfg = model.config
        self.model, self.batch = model, batch
        cfg_scale = float(sampling["cfg_scale"])
        self.set_sampling(sampling, guided=cfg_scale != 0)
        dev = model.embeddings.weight.device
        self.allocate(model.embeddings.weight.dtype, dev)
        n = cfg.num_tokens
        self.steps = n - 1
        self.cfg_table = torch.tensor(
            [cfg_schedule(i, n, cfg_scale, float(sampling["cfg_pow"])) for i in range(n)], device=dev
        )
        self.prefix_pos = torch.arange(PREFIX, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.cond = torch.zeros(self.rows, dtype=torch.long, device=dev)
        self.eager_blocks = list(model.blocks)  # the 2-token prefix: once per image, not worth a compile
        self.blocks = [common.compiled(block, compile) for block in model.blocks]
        self.head = common.compiled(self._head, compile)

    def reset(self, classes, seeds):
        self.cond.copy_(self.load_request(classes, seeds))

    def _head(self, x, c, pos):
        logits = self.model.lm_head(self.model.adaln_before_head(x, c, pos), pos).float()
        step = pos - 1  # position p predicts token p - 1
        if self.guided:
            logits = common.guide(logits, self.cfg_table[step][:, None])
        return common.filter_logits(logits / self.temperature, self.top_k, self.top_p).softmax(-1)

    def _decode(self, blocks, pos):
        m = self.model
        toks = torch.cat([self.tokens, self.tokens]) if self.guided else self.tokens
        x, c = m.embed(self.cond, toks, pos)
        mask = m.attn_mask[pos]
        for block in blocks:
            x = block(x, c, pos, mask, True)
        last = pos[-1:]
        tok = common.draw_from(self.head(x[:, -1:], c[:, -1:], last), self.u.index_select(1, last - 1))
        self.tokens.index_copy_(1, last - 1, tok)

    def prologue(self):
        self._decode(self.eager_blocks, self.prefix_pos)  # (cls, class) -> token 0
        self.pos.fill_(2)

    def step(self):
        self._decode(self.blocks, self.pos)
        self.pos.add_(1)


def decode_images(model: RAR, tokenizer, tokens: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, H, W, 3); RAR generates in the tokenizer's raster order."""
    grid = model.config.grid_size
    return tokenizer.decode_tokens(tokens, grid=(grid, grid))
