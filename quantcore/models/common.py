"""What every model family shares: the registry entry, the sampling primitives and the decoding plan."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from quantcore.quant.quantizer import allow_recompiles


@dataclass(frozen=True)
class ModelEntry:
    """A named model of this family: its config, official files and official sampling settings."""

    name: str
    config: object  # the family's frozen config dataclass
    sampling: object  # the family's frozen sampling-defaults dataclass (with to_dict())
    official_checkpoints: tuple[str, ...] = ()
    notes: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then nucleus filtering on the last dim (the official LlamaGen/PAR semantics)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum > top_p
        drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses the threshold
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One sample per row of probs (B, N, V), each image drawing from its own generator.

    Per-image generators make an image depend on its seed only, not on the batch it was served in.
    """
    u = torch.stack([torch.rand(probs.shape[1], generator=g, dtype=torch.float64) for g in generators])
    return draw_from(probs, u.to(probs.device))


def draw_from(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF samples of probs (B, N, V) for uniforms u (B, N) in [0, 1): no host sync."""
    cdf = probs.double().cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[..., -1])[..., None]).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)


def modulate(
    x: torch.Tensor, one: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """AdaLN's x * (1 + scale) + shift, where `one` (None = the constant 1) becomes the vector 1/s once
    a smoothing scale is folded into the AdaLN rows (quantcore.quant.layout.AdaLNRows)."""
    return x * ((1.0 if one is None else one) + scale) + shift


def seed_uniforms(seeds: list[int], count: int, device: torch.device) -> torch.Tensor:
    """(B, count) float64: the uniforms `draw` would consume, image by image, over a generation."""
    streams = [
        torch.rand(count, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64) for s in seeds
    ]
    return torch.stack(streams).to(device)


def guide(logits: torch.Tensor, scale) -> torch.Tensor:
    """CFG on rows [cond; uncond]: uncond + (cond - uncond) * scale."""
    cond, uncond = logits.chunk(2)
    return uncond + (cond - uncond) * scale


def compiled(fn, enabled: bool):
    """torch.compile'd fn with static shapes: one compile per input shape."""
    if not enabled:
        return fn
    allow_recompiles()
    return torch.compile(fn, fullgraph=True, dynamic=False)


class DecodePlan(ABC):
    """A family's decoding on static buffers (each family module defines its `DecodePlan`).

    reset() loads a request into the buffers, prologue() runs what precedes the repeated part, step()
    is the repeated part, run `steps` times; `tokens` holds the result. A plan whose step reads and
    writes only its buffers (no host sync, same shapes every step) is `capturable`: quantcore.fastgen
    captures one step in a CUDA graph and replays it.
    """

    steps: int
    tokens: torch.Tensor
    model: nn.Module
    capturable = True
    prologue_tokens = 0  # tokens the prologue draws (RAR's prefix step draws the first)
    # progress within a long step (VAR's scales), set only when the step runs eagerly
    report: Callable[[int], None] | None = None

    def set_sampling(self, sampling: dict, guided: bool) -> None:
        """Temperature and filtering, and the rows per step (cond + uncond halves when guided)."""
        self.temperature = float(sampling["temperature"])
        self.top_k, self.top_p = int(sampling["top_k"]), float(sampling["top_p"])
        self.guided, self.rows = guided, 2 * self.batch if guided else self.batch

    def allocate(self, dtype: torch.dtype, device: torch.device) -> None:
        """The model's KV caches for `rows` (kept by this plan), and the token and uniform buffers."""
        self.model.setup_caches(self.rows, dtype)
        self.own_caches()
        n = self.model.config.num_tokens
        self.tokens = torch.zeros(self.batch, n, dtype=torch.long, device=device)
        self.u = torch.zeros(self.batch, n, dtype=torch.float64, device=device)

    def load_request(self, classes: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """Each image's uniforms from its seed and cleared tokens; returns the CFG rows' class ids
        (cond, then the null class for uncond when guided)."""
        self.u.copy_(seed_uniforms(seeds, self.tokens.shape[1], self.u.device))
        self.tokens.zero_()
        return (
            torch.cat([classes, torch.full_like(classes, self.model.null_class)]) if self.guided else classes
        )

    def own_caches(self) -> None:
        """Keep the KV caches `setup_caches` just made: a captured graph writes to their addresses, and
        another plan of the same model may set up or clear the model's caches in between."""
        self.caches = [
            (m, m.k_cache, m.v_cache) for m in self.model.modules() if getattr(m, "k_cache", None) is not None
        ]

    def install_caches(self) -> None:
        for module, k, v in self.caches:
            module.k_cache, module.v_cache = k, v

    def tokens_after(self, step: int) -> int:
        """Tokens produced once step `step` (0-based) has run; the last step completes the image."""
        return self.tokens.shape[1] - (self.steps - 1 - step)

    @abstractmethod
    def reset(self, classes: torch.Tensor, seeds: list[int]) -> None:
        """Load a request into the buffers (`load_request` and the family's own inputs)."""

    def prologue(self) -> None:  # noqa: B027  (optional hook: most plans need none)
        """Work before the first step, outside the captured graph."""

    @abstractmethod
    def step(self) -> None: ...
