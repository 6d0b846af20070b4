"""The one sampler: each family's `DecodePlan` run on static KV caches, replayed from a CUDA graph on GPUs.

Every caller samples through here (calibration pool, job evaluation, compare, the CLI, the generation
endpoint): `generate_tokens(model, classes, seeds, **sampling)` for one batch, `TokenSampler` for many
images in fixed-size, padded chunks, `FastSampler` for a fixed batch size.

Each family module defines `DecodePlan` (quantcore.models.common.DecodePlan): static buffers and a
step that reads and writes only them, so that on a GPU the step is captured once and replayed:

    LlamaGen (raster)  one graph = one token step (class token first), replayed num_tokens times
    PAR                step widths change (1, then the region count): run step by step
    RAR                the two-token prefix runs as is; one graph = one later token step
    VAR                one graph = the whole multi-scale generation (every scale has a fixed shape)

With `compile=True` each transformer block goes through `torch.compile`, and so do the head, CFG and
filtering (LlamaGen, RAR). The final float64 inverse-CDF draw stays eager (Inductor cannot generate
float64 scans). Each image's uniforms are drawn up front from its own seeded generator and read step by
step, so an image depends on its class and seed only, never on the batch it was sampled in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import MISSING, fields

import torch
from torch import nn

from quantcore.errors import ConfigError
from quantcore.models import family as family_of

_CHECKS = {
    "temperature": (lambda v: v > 0, "> 0"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (lambda v: v >= 0, ">= 0"),
    "cfg_scale": (lambda v: v >= 0, ">= 0"),
}


def check_classes(classes: Sequence[int], num_classes: int) -> None:
    """Every label in 0..num_classes-1, or a ConfigError naming the first one that is not."""
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(
            f"class labels {bad} out of range; this model has classes 0..{num_classes - 1}",
            field=("classes", list(classes).index(bad[0])),
        )


def sampling_settings(family: str, overrides: dict) -> dict:
    """The family's official sampling defaults under the caller's keywords (None = the default);
    unknown names and bad values are refused."""
    known = fields(family_of(family).sampling_defaults)
    names = [f.name for f in known]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown sampling parameter(s) {unknown} for {family}; known: {names}",
            field=("sampling", unknown[0]),
        )
    defaults = {f.name: f.default for f in known if f.default is not MISSING}
    merged = defaults | {k: v for k, v in overrides.items() if v is not None}
    missing = [n for n in names if n not in merged]
    if missing:
        raise ConfigError(f"sampling parameter(s) {missing} have no default for {family}; give them")
    for name, (ok, rule) in _CHECKS.items():
        if name in merged and not ok(merged[name]):
            raise ConfigError(f"{name} must be {rule}, got {merged[name]}", field=("sampling", name))
    return merged


class FastSampler:
    """Decoding for a fixed batch size on static buffers; CUDA-graph replay where the device allows.

    `sampling` takes the family's sampling keywords (defaults filled in). `graph=None` captures on CUDA
    when the plan is capturable and runs step by step elsewhere.
    """

    def __init__(self, model: nn.Module, batch: int, sampling: dict, *, compile: bool = False, graph=None):
        family = getattr(model, "family", None)
        plan_type = family_of(family).decode_plan if family else None
        if plan_type is None:
            raise ConfigError(f"no sampler for family {family!r}")
        if batch < 1:
            raise ConfigError(f"batch must be >= 1, got {batch}")
        self.model, self.batch = model, batch
        self.sampling = sampling_settings(family, sampling)
        self.plan = plan_type(model, batch, self.sampling, compile)
        device = self.plan.tokens.device
        self.graph = None
        if graph is None:
            graph = device.type == "cuda" and self.plan.capturable
        if graph:
            if device.type != "cuda":
                raise ConfigError("CUDA graphs need the model on a CUDA device; use graph=False")
            if not self.plan.capturable:
                raise ConfigError(f"{family} steps change shape (PAR): they cannot be replayed; graph=False")
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
        """Tokens (batch, num_tokens) in the family's generation order.

        `progress`, if given, is called with the number of tokens produced so far after every step
        (and, run step by step, after each of VAR's scales; replayed from a graph, once at the end)."""
        if classes.shape != (self.batch,) or len(seeds) != self.batch:
            raise ConfigError(
                f"this sampler was built for batch {self.batch}: got {tuple(classes.shape)} classes and "
                f"{len(seeds)} seeds; give one seed per image"
            )
        plan = self.plan
        plan.install_caches()
        plan.reset(classes.to(plan.tokens.device), seeds)
        plan.prologue()
        if progress is not None and plan.prologue_tokens:
            progress(plan.prologue_tokens)
        plan.report = progress if self.graph is None else None
        try:
            for i in range(plan.steps):
                self.graph.replay() if self.graph is not None else plan.step()
                if progress is not None:
                    progress(plan.tokens_after(i))
        finally:
            plan.report = None
        return plan.tokens.clone()

    def close(self) -> None:
        """Drop the graph and this sampler's KV caches."""
        self.graph = None
        self.plan.caches = []
        self.model.clear_caches()


@torch.no_grad()
def generate_tokens(model: nn.Module, classes: torch.Tensor, seeds: list[int], progress=None, **sampling):
    """Tokens (B, L) for one batch, step by step (no graph): the library's sampling call."""
    sampler = FastSampler(model, classes.shape[0], sampling, graph=False)
    try:
        return sampler.generate(classes, seeds, progress)
    finally:
        sampler.close()


class TokenSampler:
    """Tokens for any number of images in fixed-size chunks (the last one padded), on one FastSampler.

    Every kernel sees the same shapes whatever the request size, so an image's tokens depend on its
    class and seed only (GEMM blocking, and so rounding, can change with the batch). The sampler (its
    KV caches and CUDA graph) is kept while the sampling settings stay the same.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 8, graph: bool | None = None):
        self.model, self.chunk_size, self.graph = model, chunk_size, graph
        self._sampler: tuple[tuple, FastSampler] | None = None

    @property
    def num_classes(self) -> int:
        return self.model.config.num_classes

    def progress_total(self, num_images: int) -> int:
        """Tokens a progress callback counts up to for `num_images` images."""
        return -(-num_images // self.chunk_size) * self.model.config.num_tokens

    @torch.no_grad()
    def generate_tokens(
        self,
        classes: Sequence[int] | torch.Tensor,
        seeds: Sequence[int],
        progress: Callable[[int], None] | None = None,
        **sampling,
    ) -> torch.Tensor:
        classes = [int(c) for c in classes]
        check_classes(classes, self.num_classes)
        if len(classes) != len(seeds):
            raise ConfigError(
                f"got {len(seeds)} seeds for {len(classes)} classes; give one seed per image",
                field=("seeds",),
            )
        sampler = self._fast_sampler(sampling_settings(self.model.family, sampling))
        device = sampler.plan.tokens.device
        out = []
        for start in range(0, len(classes), self.chunk_size):
            labels, chunk_seeds = self._padded(classes, start), self._padded(seeds, start)
            done = start // self.chunk_size * self.model.config.num_tokens
            report = None if progress is None else (lambda n, done=done: progress(done + n))
            tokens = sampler.generate(torch.tensor(labels, device=device), chunk_seeds, progress=report)
            out.append(tokens[: min(self.chunk_size, len(classes) - start)])
        return torch.cat(out)

    def _fast_sampler(self, settings: dict) -> FastSampler:
        key = tuple(sorted(settings.items()))
        if self._sampler is None or self._sampler[0] != key:
            self.close()
            self._sampler = (key, FastSampler(self.model, self.chunk_size, settings, graph=self.graph))
        return self._sampler[1]

    def _padded(self, values: Sequence[int], start: int) -> list[int]:
        chunk = [int(v) for v in values[start : start + self.chunk_size]]
        return chunk + [chunk[-1]] * (self.chunk_size - len(chunk))

    def close(self) -> None:
        if self._sampler is not None:
            self._sampler[1].close()
            self._sampler = None
