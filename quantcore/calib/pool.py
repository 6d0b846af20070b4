"""The calibration pool: the FP model's own CFG samples (cond and uncond halves), then a selection.

The official pipelines capture the inputs of the final generation step (a teacher-forced sequence)
for both CFG halves, so a pool of N generated images gives 2N sequences: rows [0, N) carry the class
labels, rows [N, 2N) the null class with the same tokens. DGC (or random/uniform) keeps half of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from quantcore.errors import Canceled
from quantcore.fastgen import TokenSampler
from quantcore.methods.selection import select_calibration
from quantcore.models import family
from quantcore.spec import CalibrationSpec

Progress = Callable[[str, float], None]
CancelCheck = Callable[[], bool]


@dataclass
class CalibrationSet:
    classes: torch.Tensor  # (M,) class ids; the null class marks uncond rows
    tokens: torch.Tensor  # (M, L) in generation order
    pool_size: int
    indices: list[int]
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.classes.numel()

    def batches(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            yield self.classes[start : start + batch_size], self.tokens[start : start + batch_size]

    def record(self) -> dict:
        return {"pool_size": self.pool_size, "selected": len(self), "indices": self.indices, **self.info}


def check_cancel(should_cancel: CancelCheck | None, where: str) -> None:
    if should_cancel is not None and should_cancel():
        raise Canceled(f"canceled during {where}")


@torch.no_grad()
def last_block_features(model, classes: torch.Tensor, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Token 0's output of the last transformer block (the feature the official DGC ranks)."""

    captured: list[torch.Tensor] = []
    block = model.get_submodule(family(model.family).quant_layout(model).feature_module)
    handle = block.register_forward_hook(lambda m, a, out: captured.append(out[:, 0].float().cpu()))
    try:
        for start in range(0, classes.numel(), batch_size):
            model.sequence_logits(classes[start : start + batch_size], tokens[start : start + batch_size])
    finally:
        handle.remove()
    return torch.cat(captured)


@torch.no_grad()
def build_calibration_set(
    model,
    spec: CalibrationSpec,
    sampling: dict,
    progress: Progress | None = None,
    should_cancel: CancelCheck | None = None,
) -> CalibrationSet:
    """Generate spec.num_samples images with the FP model (CFG on), pool both halves, select."""
    cfg = model.config
    official = family(model.family).quant_layout(model).official
    device = next(model.parameters()).device
    # the official VAR/RAR scripts draw randint(0, 999): never the last class
    high = cfg.num_classes - 1 if official.exclude_last_class else cfg.num_classes
    labels = torch.randint(0, high, (spec.num_samples,), generator=torch.Generator().manual_seed(spec.seed))
    seeds = [spec.seed * 1_000_003 + i for i in range(spec.num_samples)]
    sampler = TokenSampler(model, min(spec.batch_size, spec.num_samples))
    total = sampler.progress_total(spec.num_samples)

    def step(produced: int) -> None:  # every decoding step: one batch of a large model takes a while
        check_cancel(should_cancel, "calibration sampling")
        if progress:
            progress("calibration-pool", produced / total)

    try:
        tokens = sampler.generate_tokens(labels.tolist(), seeds, step, **sampling).cpu()
    finally:
        sampler.close()
    pool_classes = torch.cat([labels, torch.full_like(labels, model.null_class)])
    pool_tokens = torch.cat([tokens, tokens])
    features = None
    if spec.selection.startswith("dgc"):
        check_cancel(should_cancel, "calibration selection")
        features = last_block_features(
            model, pool_classes.to(device), pool_tokens.to(device), spec.batch_size
        )
    indices, info = select_calibration(
        spec.selection,
        features=features,
        num_pool=pool_classes.numel(),
        seed=spec.seed,
        generation_batch=official.dgc_batch,
    )
    indices = indices.sort().values
    return CalibrationSet(
        classes=pool_classes[indices].to(device),
        tokens=pool_tokens[indices].to(device),
        pool_size=pool_classes.numel(),
        indices=indices.tolist(),
        info={"selection": spec.selection, "seed": spec.seed, **info},
    )
