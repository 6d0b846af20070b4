"""Throughput sampling: compiled transformer blocks and CUDA-graph decoding over static KV caches.

`FastSampler(model, batch, sampling)` keeps one set of static buffers (KV caches, inputs, the token
grid) for a fixed batch size and runs each family's decoding step on them with no host sync, so that
on a GPU the step can be captured once in a CUDA graph and replayed:

    LlamaGen (raster)  one graph = one token step (class token first), replayed num_tokens times
    RAR                the two-token prefix runs as is; one graph = one later token step
    VAR                one graph = the whole multi-scale generation (every scale has a fixed shape)

With `compile=True` each transformer block goes through `torch.compile` (all blocks of a model share
one compiled graph: same code, same shapes), and so do the head, CFG and filtering (LlamaGen, RAR),
so norms, RoPE, the quantizers' rounding and the GEMM epilogues fuse into few kernels. The final
float64 inverse-CDF draw stays eager (Inductor cannot generate float64 scans).

The sampling semantics are the library's (`<family>.generate_tokens`): the same CFG (LlamaGen's
interval, RAR's cosine ramp, VAR's linear ramp), temperature, top-k/top-p, and the same per-image
random streams -- each image's uniforms are drawn up front from its own seeded generator and read
by the graph step by step -- so an image still depends on its class and seed only, and the tokens
equal the library sampler's up to float rounding (tested in float64 on CPU).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import MISSING, fields

import torch
from torch import nn

from quantcore.errors import ConfigError
from quantcore.models import family_module
from quantcore.models.common import draw_from, filter_logits
from quantcore.models.rar import PREFIX, cfg_schedule
from quantcore.models.var import filter_logits as var_filter_logits  # VAR's official top-k/top-p


def seed_uniforms(seeds: list[int], count: int, device: torch.device) -> torch.Tensor:
    """(B, count) float64: the uniforms `common.draw` would consume, image by image, over a generation."""
    streams = [
        torch.rand(count, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64) for s in seeds
    ]
    return torch.stack(streams).to(device)


def _compiled(fn, enabled: bool, dynamic: bool | None = False):
    """torch.compile'd fn; static shapes (one compile per batch size) unless `dynamic` is None."""
    return torch.compile(fn, fullgraph=True, dynamic=dynamic) if enabled else fn


# ---------------------------------------------------------------------------------------------------
# Per-family decoding plans: static buffers + a step that reads and writes only them
# ---------------------------------------------------------------------------------------------------


class _Plan(ABC):
    """reset() loads a request into the buffers, prologue() runs what precedes the replayed part,
    step() is the captured part, run `steps` times; tokens holds the result."""

    steps: int
    tokens: torch.Tensor
    model: nn.Module

    def set_sampling(self, sampling: dict, guided: bool) -> None:
        """Temperature and filtering, and the rows per step (cond + uncond halves when guided)."""
        self.temperature = float(sampling["temperature"])
        self.top_k, self.top_p = int(sampling["top_k"]), float(sampling["top_p"])
        self.guided, self.rows = guided, 2 * self.batch if guided else self.batch

    def own_caches(self) -> None:
        """Keep the KV caches `setup_caches` just made: a captured graph writes to their addresses, and
        other code (the library sampler) may set up or clear the model's caches in between."""
        self.caches = [
            (m, m.k_cache, m.v_cache) for m in self.model.modules() if getattr(m, "k_cache", None) is not None
        ]

    def install_caches(self) -> None:
        for module, k, v in self.caches:
            module.k_cache, module.v_cache = k, v

    @abstractmethod
    def reset(self, classes: torch.Tensor, seeds: list[int]) -> None: ...

    def prologue(self) -> None:  # noqa: B027  (optional hook: most plans need none)
        """Work before the first step, outside the captured graph."""

    @abstractmethod
    def step(self) -> None: ...


def _guide(logits: torch.Tensor, scale) -> torch.Tensor:
    cond, uncond = logits.chunk(2)
    return uncond + (cond - uncond) * scale


class _LlamaGenPlan(_Plan):
    def __init__(self, model, batch: int, sampling: dict, compile: bool):
        cfg = model.config
        if cfg.par_regions:
            raise ConfigError("the fast sampler decodes raster LlamaGen only; PAR steps change width")
        self.model, self.batch = model, batch
        self.cfg_scale = float(sampling["cfg_scale"])
        self.cfg_interval = int(sampling["cfg_interval"])
        self.set_sampling(sampling, guided=self.cfg_scale > 1.0)
        dev, dtype = model.rope.device, model.tok_embeddings.weight.dtype
        model.setup_caches(self.rows, dtype)
        self.own_caches()
        self.steps = cfg.num_tokens
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.h = torch.zeros(self.rows, 1, cfg.dim, dtype=dtype, device=dev)
        self.tokens = torch.zeros(batch, cfg.num_tokens, dtype=torch.long, device=dev)
        self.u = torch.zeros(batch, cfg.num_tokens, dtype=torch.float64, device=dev)
        self.blocks = [_compiled(layer, compile) for layer in model.layers]
        self.head = _compiled(self._head, compile)

    def reset(self, classes, seeds):
        m = self.model
        cond = torch.cat([classes, torch.full_like(classes, m.null_class)]) if self.guided else classes
        self.h.copy_(m.cls_embedding.embedding_table(cond.to(self.h.device))[:, None])
        self.u.copy_(seed_uniforms(seeds, self.steps, self.u.device))
        self.pos.zero_()

    def _head(self, h, pos):
        m = self.model
        logits = m.output(m.norm(h), pos).float()
        if self.guided:
            guided = _guide(logits, self.cfg_scale)
            if self.cfg_interval >= 0:  # step index == pos in raster order
                guided = torch.where(pos <= self.cfg_interval, guided, logits.chunk(2)[0])
            logits = guided
        return filter_logits(logits / self.temperature, self.top_k, self.top_p).softmax(-1)

    def step(self):
        m, pos = self.model, self.pos
        rope, mask, h = m.rope[pos], m.mask[pos], self.h
        for block in self.blocks:
            h = block(h, pos, rope, mask, True)
        tok = draw_from(self.head(h, pos), self.u.index_select(1, pos))  # (B, 1)
        self.tokens.index_copy_(1, pos, tok)
        self.h.copy_(m.tok_embeddings(torch.cat([tok, tok]) if self.guided else tok))
        pos.add_(1)


class _RARPlan(_Plan):
    def __init__(self, model, batch: int, sampling: dict, compile: bool):
        cfg = model.config
        self.model, self.batch = model, batch
        cfg_scale = float(sampling["cfg_scale"])
        self.set_sampling(sampling, guided=cfg_scale != 0)
        dev = model.embeddings.weight.device
        model.setup_caches(self.rows, model.embeddings.weight.dtype)
        self.own_caches()
        n = cfg.num_tokens
        self.steps = n - 1
        self.cfg_table = torch.tensor(
            [cfg_schedule(i, n, cfg_scale, float(sampling["cfg_pow"])) for i in range(n)], device=dev
        )
        self.prefix_pos = torch.arange(PREFIX, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.cond = torch.zeros(self.rows, dtype=torch.long, device=dev)
        self.tokens = torch.zeros(batch, n, dtype=torch.long, device=dev)
        self.u = torch.zeros(batch, n, dtype=torch.float64, device=dev)
        self.eager_blocks = list(model.blocks)  # the 2-token prefix: once per image, not worth a compile
        self.blocks = [_compiled(block, compile) for block in model.blocks]
        self.head = _compiled(self._head, compile)

    def reset(self, classes, seeds):
        m = self.model
        cond = torch.cat([classes, torch.full_like(classes, m.null_class)]) if self.guided else classes
        self.cond.copy_(cond)
        self.u.copy_(seed_uniforms(seeds, self.tokens.shape[1], self.u.device))
        self.tokens.zero_()

    def _head(self, x, c, pos):
        logits = self.model.lm_head(self.model.adaln_before_head(x, c, pos), pos).float()
        step = pos - 1  # position p predicts token p - 1
        if self.guided:
            logits = _guide(logits, self.cfg_table[step][:, None])
        return filter_logits(logits / self.temperature, self.top_k, self.top_p).softmax(-1)

    def _decode(self, blocks, pos):
        m = self.model
        toks = torch.cat([self.tokens, self.tokens]) if self.guided else self.tokens
        x, c = m.embed(self.cond, toks, pos)
        mask = m.attn_mask[pos]
        for block in blocks:
            x = block(x, c, pos, mask, True)
        last = pos[-1:]
        tok = draw_from(self.head(x[:, -1:], c[:, -1:], last), self.u.index_select(1, last - 1))
        self.tokens.index_copy_(1, last - 1, tok)

    def prologue(self):
        self._decode(self.eager_blocks, self.prefix_pos)  # (cls, class) -> token 0
        self.pos.fill_(2)

    def step(self):
        self._decode(self.blocks, self.pos)
        self.pos.add_(1)


class _VARPlan(_Plan):
    def __init__(self, model, batch: int, sampling: dict, compile: bool):
        cfg = model.config
        self.model, self.batch = model, batch
        self.cfg_scale = float(sampling["cfg_scale"])
        if sampling["more_smooth"]:
            raise ConfigError("more_smooth=True has no token form; use more_smooth=False")
        self.set_sampling(sampling, guided=self.cfg_scale != 0)
        dev = model.pos_1LC.device
        model.setup_caches(self.rows, model.pos_1LC.dtype)
        self.own_caches()
        self.steps = 1
        table = model.attn_bias_for_masking[0, 0]
        self.scales = [
            (start, end, torch.arange(start, end, device=dev), table[start:end, :end].contiguous())
            for start, end in cfg.scale_bounds
        ]
        self.cond = torch.zeros(self.rows, cfg.embed_dim, dtype=model.pos_1LC.dtype, device=dev)
        self.tokens = torch.zeros(batch, cfg.num_tokens, dtype=torch.long, device=dev)
        self.u = torch.zeros(batch, cfg.num_tokens, dtype=torch.float64, device=dev)
        vq = model.quantizer
        self.f_hat = vq.embedding.weight.new_zeros(batch, cfg.cvae, cfg.grid_size, cfg.grid_size)
        # ten scales of different lengths: per batch size the blocks compile three times (the 1-token
        # first scale, the middle scales with a dynamic length, the last scale whose full-width cache
        # slice changes the matmul's layout guard); the head (ten calls per image) stays eager
        self.blocks = [_compiled(block, compile, dynamic=None) for block in model.blocks]
        self.head = self._head

    def reset(self, classes, seeds):
        m = self.model
        rows = torch.cat([classes, torch.full_like(classes, m.null_class)]) if self.guided else classes
        self.cond.copy_(m.class_emb(rows.to(self.cond.device)))
        self.u.copy_(seed_uniforms(seeds, self.tokens.shape[1], self.u.device))

    def _head(self, x, pos, t: float, u):
        logits = self.model.head(self.model.head_nm(x, self.cond), pos).float()
        if self.guided:
            b = self.batch
            logits = (1 + t) * logits[:b] - t * logits[b:]
        probs = var_filter_logits(logits / self.temperature, self.top_k, self.top_p).softmax(-1)
        return draw_from(probs, u)

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
            if si != last:
                pn = cfg.patch_nums[si]
                h = vq.embedding(idx).transpose(1, 2).reshape(self.batch, cfg.cvae, pn, pn)
                _, nxt = vq.next_autoregressive_input(si, self.f_hat, h)
                x = m.scale_input(nxt.flatten(2).transpose(1, 2), end, lvl_pos)
                if self.guided:
                    x = x.repeat(2, 1, 1)


PLANS = {"llamagen": _LlamaGenPlan, "rar": _RARPlan, "var": _VARPlan}


# ---------------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------------


class FastSampler:
    """Decoding for a fixed batch size on static buffers; CUDA-graph replay where the device allows.

    `sampling` takes the family's sampling keywords (the registry entry's defaults, e.g.
    `MODELS[name].sampling.to_dict()`). `graph=None` captures on CUDA and runs step by step elsewhere.
    """

    def __init__(self, model: nn.Module, batch: int, sampling: dict, *, compile: bool = False, graph=None):
        family = getattr(model, "family", None)
        if family not in PLANS:
            raise ConfigError(f"no fast sampler for family {family!r}; supported: {sorted(PLANS)}")
        if batch < 1:
            raise ConfigError(f"batch must be >= 1, got {batch}")
        self.model, self.batch = model, batch
        # the family's own defaults under the caller's keywords (as its generate_tokens takes them)
        known = fields(family_module(family).SamplingDefaults)
        unknown = sorted(set(sampling) - {f.name for f in known})
        if unknown:
            raise ConfigError(
                f"unknown sampling parameter(s) {unknown} for {family}; known: {[f.name for f in known]}"
            )
        sampling = {f.name: f.default for f in known if f.default is not MISSING} | dict(sampling)
        self.plan = PLANS[family](model, batch, sampling, compile)
        device = self.plan.tokens.device
        self.graph = None
        if graph is None:
            graph = device.type == "cuda"
        if graph:
            if device.type != "cuda":
                raise ConfigError("CUDA graphs need the model on a CUDA device; use graph=False")
            self._capture()

    @torch.no_grad()
    def _capture(self) -> None:
        classes = torch.zeros(self.batch, dtype=torch.long, device=self.plan.tokens.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # compile, autotune and library handles stay out of the capture
            for _ in range(2):
                self.plan.reset(classes, list(range(self.batch)))
                self.plan.prologue()
                self.plan.step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.plan.step()

    @torch.no_grad()
    def generate(self, classes: torch.Tensor, seeds: list[int], progress=None) -> torch.Tensor:
        """Tokens (batch, num_tokens) in the family's generation order, as `generate_tokens` returns them.

        `progress`, if given, is called with the number of tokens produced so far (per step; VAR's one
        captured step reports once, at the end)."""
        if classes.shape != (self.batch,) or len(seeds) != self.batch:
            raise ConfigError(
                f"this sampler was built for batch {self.batch}: got {tuple(classes.shape)} classes and "
                f"{len(seeds)} seeds"
            )
        plan = self.plan
        plan.install_caches()
        plan.reset(classes.to(plan.tokens.device), seeds)
        plan.prologue()
        total = plan.tokens.shape[1]
        for i in range(plan.steps):
            self.graph.replay() if self.graph is not None else plan.step()
            if progress is not None:  # each step yields one token, the last (VAR: only) one the rest
                progress(total - (plan.steps - 1 - i))
        return plan.tokens.clone()

    def close(self) -> None:
        """Drop the graph and this sampler's KV caches."""
        self.graph = None
        self.plan.caches = []
        self.model.clear_caches()
