"""`quantize(model, recipe, calibration)`: run a recipe's passes on a model, in place.

Every pass is a registered handler (`quantcore.methods.registry`) that reads the family's `QuantLayout`
through a `PassContext` and folds what it computes into the producer of each linear's input, so the
quantized model computes nothing extra at run time. Order (official): SmoothQuant -> symmetric shift ->
GPS, each on the activations the previous one left, then the final calibration of weights (per output
row) and activations (per tensor, STWQ tables or dynamic per token).

How ranges are observed is the recipe's `calibration` (`CalibrationPlan` below):
- official: SmoothQuant and GPS gather their statistics on the float model; every quantizer takes its
  parameters inside a forward where everything already set is quantized ("init" mode), so each layer is
  calibrated on the quantized outputs of the layers before it. A fold resets the quantizers whose input
  or weight it changed, and the next quantized forward sets them again; the last one sets the final
  quantizers (RAR: only those; VAR/PAR: every activation quantizer anew). Batches as the family's code:
  the whole set in one forward (RAR) or 64 rows averaged by an EMA (VAR/PAR).
- staged: every range (per-channel ones for the shift and GPS, then the final ones in one sweep) is
  observed on the float model, with statistics over the whole set.
Sink tokens stay out of the smoothing statistics of sink-aware sites (reference §4, pitfall 3).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from quantcore.calib.pool import CalibrationSet, CancelCheck, Progress, check_cancel
from quantcore.errors import ConfigError
from quantcore.methods.registry import handler_for
from quantcore.models import family
from quantcore.quant.layout import AdaLNRows, FoldSite, QuantLayout, fold_scale, fold_shift
from quantcore.quant.modules import (
    QuantLinear,
    QuantMatMul,
    calibrate_weights,
    describe_quant_modules,
    finalize_calibration,
    iter_quant_modules,
    make_act_quantizer,
    set_quant_mode,
    swap_module,
)
from quantcore.quant.quantizer import LogSqrt2Quantizer, UniformQuantizer
from quantcore.recipe import Calibration, Recipe

# Batch and momentum of the running average where a recipe asks for one and the family has none (VAR/PAR's)
EMA_BATCH, EMA_MOMENTUM = 64, 0.9


def layout_of(model: nn.Module) -> QuantLayout:
    return family(model.family).quant_layout(model)


@dataclass(frozen=True)
class CalibrationPlan:
    """A recipe's `calibration` resolved against the family's official behaviour (`layout.official`)."""

    sequential: bool  # quantizers set themselves inside quantized forwards (official)
    batch_size: int | None  # rows per calibration forward; None: the whole set at once
    ema: float | None  # momentum of the running average over batches
    include_zero: bool
    sink_aware_heads: bool
    causal_mask: bool
    recalibrate_all: bool
    head_second_shift: bool

    def to_dict(self) -> dict:
        return asdict(self)


def plan_calibration(calibration: Calibration, layout: QuantLayout, batch_size: int) -> CalibrationPlan:
    official = layout.official
    if calibration.mode == "official":
        use_ema = official.ema is not None if calibration.ema is None else calibration.ema
        batches = (
            (official.batch_size or EMA_BATCH, official.ema or EMA_MOMENTUM) if use_ema else (None, None)
        )
        defaults = dict(
            include_zero=official.include_zero,
            sink_aware_heads=False,
            causal_mask=official.causal_mask,
            recalibrate_all=official.recalibrate_all,
            head_second_shift=official.head_second_shift,
        )
    else:
        batches = (batch_size, None)
        defaults = dict(
            include_zero=False,
            sink_aware_heads=True,
            causal_mask=True,
            recalibrate_all=True,
            head_second_shift=False,
        )
    chosen = {
        k: v if getattr(calibration, k) is None else getattr(calibration, k) for k, v in defaults.items()
    }
    if not chosen["causal_mask"] and not layout.unmasked_forward:
        raise ConfigError("calibration.causal_mask: this family has no unmasked calibration forward")
    return CalibrationPlan(calibration.mode == "official", *batches, **chosen)


@dataclass
class QuantizeReport:
    recipe: Recipe
    layers: dict[str, dict]
    plan: CalibrationPlan | None = None
    stages: list[dict] = field(default_factory=list)
    scales: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "recipe": self.recipe.model_dump(mode="json"),
            "calibration_plan": self.plan.to_dict() if self.plan else None,
            "layers": self.layers,
            "stages": self.stages,
            "scales": self.scales,
        }


Observer = Callable[[str, torch.Tensor, torch.Tensor], None]


class PassContext:
    """What a pass handler works with: the model and its layout, sweeps over the calibration set in the
    plan's batches, quantizers built to the recipe's bits and plan, and folds that keep track of the
    quantizers they make stale."""

    def __init__(self, model, layout, calibration, recipe: Recipe, plan, progress, should_cancel):
        self.model, self.layout, self.calibration, self.plan = model, layout, calibration, plan
        self.w_bits, self.a_bits, self.percentiles = recipe.w_bits, recipe.a_bits, recipe.percentiles
        self.progress, self.should_cancel = progress, should_cancel
        self.quantize_attention = recipe.quantize_attention
        self.granularity = handler_for(recipe.granularity) if recipe.granularity else None
        self.heads = {name for site in layout.fold_sites if site.head for name in site.linears}
        self._forward_kwargs = {"masked": plan.causal_mask} if layout.unmasked_forward else {}

    # --- the layout -----------------------------------------------------------------------------

    def lead(self, site: FoldSite) -> QuantLinear:
        """The site's first linear: its input drives the statistics."""
        return self.model.get_submodule(site.linears[0])

    def linears(self, site: FoldSite) -> list[QuantLinear]:
        return [self.model.get_submodule(name) for name in site.linears]

    def sinks(self, site: FoldSite) -> tuple[int, ...]:
        """Positions left out of this site's statistics (and in float while it is smoothed)."""
        return () if site.head and not self.plan.sink_aware_heads else self.layout.sink_positions

    def non_sink(self, site: FoldSite, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """(N, C) rows of x at the positions that count for this site."""
        keep = ~torch.isin(pos, torch.tensor(self.sinks(site), device=pos.device, dtype=pos.dtype))
        return x[..., keep, :].reshape(-1, x.shape[-1])

    # --- sweeps ---------------------------------------------------------------------------------

    def fp_sweep(self, stage: str, observe: Observer | None = None, names=(), on_batch=None) -> None:
        """One pass over the calibration set with every quantizer off; observe(name, x, pos) sees the
        input of each named module, on_batch() runs after each batch."""
        set_quant_mode(self.model, weights="off", acts="off")
        self.sweep(stage, observe, names, on_batch)

    def quantized_sweep(self, stage: str) -> None:
        """One pass with weights and activations quantized: quantizers that are not set take their
        parameters from the forward they are in (so downstream layers see quantized inputs)."""
        for _, module in iter_quant_modules(self.model):
            if isinstance(module, QuantLinear) and not bool(module.weight_quantizer.initialized):
                module.calibrate_weight()
        set_quant_mode(self.model, weights="on")
        for q in self.act_quantizers():
            q.ema = self.plan.ema
            q.set_mode("on" if bool(q.initialized) else "init")
        self.sweep(stage)

    def channel_ranges(self, stage: str) -> None:
        """Per-input-channel quantizers on every fold site's input, calibrated without its sinks: staged on
        the float model (first linears only), official inside a quantized forward (every linear of the
        site, as the official code gives PAR's w3 its own)."""
        sites = self.layout.fold_sites
        if not self.plan.sequential:
            set_quant_mode(self.model, weights="off", acts="off")
            for site in sites:
                lead = self.lead(site)
                lead.input_quantizer = self._channel_quantizer(site, lead)
                lead.input_quantizer.set_mode("calibrate")
            self.sweep(stage)
            for site in sites:
                self.lead(site).input_quantizer.finalize()
            return
        for site in sites:
            for linear in self.linears(site):
                if linear.input_quantizer.granularity != "channel":
                    linear.input_quantizer = self._channel_quantizer(site, linear)
        self.quantized_sweep(stage)

    @torch.no_grad()
    def sweep(self, stage: str, observe: Observer | None = None, names=(), on_batch=None) -> None:
        """One pass over the calibration set with the quantizers as they are."""
        size = self.plan.batch_size or len(self.calibration)
        total = max(1, -(-len(self.calibration) // size))
        handles = [
            self.model.get_submodule(n).register_forward_pre_hook(
                lambda m, args, n=n: observe(n, args[0], args[1])
            )
            for n in (names if observe else ())
        ]
        try:
            for i, (classes, tokens) in enumerate(self.calibration.batches(size)):
                check_cancel(self.should_cancel, stage)
                self.model.sequence_logits(classes, tokens, **self._forward_kwargs)
                if on_batch:
                    on_batch()
                if self.progress:
                    self.progress(stage, (i + 1) / total)
        finally:
            for h in handles:
                h.remove()

    def average(self, old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        """The plan's running average of per-batch values (the first batch starts it)."""
        if old is None or self.plan.ema is None:
            return new
        return self.plan.ema * old + (1 - self.plan.ema) * new

    def layer_done(self, stage: str, site: FoldSite, index: int) -> None:
        """Per-layer progress while a pass folds its results, layer by layer."""
        if self.progress:
            self.progress(f"{stage}-fold {site.linears[0]}", (index + 1) / len(self.layout.fold_sites))

    # --- quantizers -----------------------------------------------------------------------------

    def act_quantizer(self, granularity: str, **kwargs):
        """An activation quantizer at the recipe's bits and percentiles; the plan's include-zero applies to
        the uniform per-tensor/per-channel kinds (the official RAR leaves its token-wise tables alone)."""
        include_zero = self.plan.include_zero and granularity in ("tensor", "channel")
        return make_act_quantizer(
            self.a_bits, granularity, pcts=self.percentiles, include_zero=include_zero, **kwargs
        )

    def final_act_quantizer(self, linear: str):
        """The input quantizer `linear` runs with: the head per-tensor (reference §4), else the
        granularity pass's choice, else per-tensor."""
        if linear not in self.heads and self.granularity is not None:
            chosen = self.granularity.act_quantizer(self, linear)
            if chosen is not None:
                return chosen
        return self.act_quantizer("tensor")

    def _channel_quantizer(self, site: FoldSite, linear: QuantLinear) -> UniformQuantizer:
        q = self.act_quantizer("channel", channels=linear.in_features)
        q.set_passthrough(self.sinks(site))
        return q

    def act_quantizers(self):
        for _, module in iter_quant_modules(self.model):
            if isinstance(module, QuantLinear):
                yield module.input_quantizer
            else:
                yield from (q for q in (module.a_quantizer, module.b_quantizer) if q is not None)

    # --- folding --------------------------------------------------------------------------------

    def fold_scale(self, site: FoldSite, s: torch.Tensor) -> None:
        fold_scale(self.model, site, s)
        self._invalidate(site)

    def fold_shift(self, site: FoldSite, p: torch.Tensor) -> None:
        fold_shift(self.model, site, p)
        self._invalidate(site)

    def _invalidate(self, site: FoldSite) -> None:
        """A fold changed the site's input and weights and, for AdaLN rows, the producer's weight."""
        for linear in self.linears(site):
            linear.input_quantizer.invalidate()
            linear.weight_quantizer.invalidate()
        if isinstance(site.producer, AdaLNRows):
            self.model.get_submodule(site.producer.linear).weight_quantizer.invalidate()


def swap_in_quant_modules(ctx: PassContext) -> None:
    """Quantized linears (input quantizers already of their final kind) and matmuls, all off."""
    model = ctx.model
    for name in ctx.layout.all_linears:
        linear = model.get_submodule(name)
        weight_q = UniformQuantizer(
            ctx.w_bits, "row", channels=linear.out_features, include_zero=ctx.plan.include_zero
        )
        # weight-only recipes keep an input quantizer that never turns on
        input_q = ctx.final_act_quantizer(name) if ctx.a_bits else make_act_quantizer(ctx.w_bits)
        swap_module(model, name, QuantLinear(linear.weight, linear.bias, weight_q, input_q))
    if ctx.a_bits is not None and ctx.quantize_attention:
        for name in ctx.layout.matmuls:
            if ctx.quantize_attention == "kv":  # K and V only: the first operands stay as they are
                first = None
            elif ctx.layout.log_sqrt2_probs and name in ctx.layout.prob_matmuls:
                first = LogSqrt2Quantizer(ctx.a_bits, pcts=ctx.percentiles)
            else:
                first = ctx.act_quantizer("tensor")
            swap_module(model, name, QuantMatMul(first, ctx.act_quantizer("tensor")))
    set_quant_mode(model, weights="off", acts="off")


def calibrate_final(ctx: PassContext) -> None:
    """Weights per output row; activations with their final granularity, observed on the folded model."""
    model = ctx.model
    if ctx.a_bits is None:
        calibrate_weights(model)
        set_quant_mode(model, weights="on", acts="off")
        return
    if not ctx.plan.sequential:
        calibrate_weights(model)
        set_quant_mode(model, weights="on", acts="off")
        for name in ctx.layout.all_linears:
            model.get_submodule(name).input_quantizer = ctx.final_act_quantizer(name)
        set_quant_mode(model, acts="calibrate")
        ctx.sweep("calibrate")
        finalize_calibration(model)
    else:
        for site in ctx.layout.fold_sites:
            for name in site.linears:
                linear = model.get_submodule(name)
                if linear.input_quantizer.granularity == "channel":  # the smoothing passes' stand-in
                    linear.input_quantizer = ctx.final_act_quantizer(name)
        if ctx.plan.recalibrate_all:
            for q in ctx.act_quantizers():
                q.invalidate()
        ctx.quantized_sweep("calibrate")
    set_quant_mode(model, weights="on", acts="on")


@torch.no_grad()
def quantize(
    model: nn.Module,
    recipe: Recipe,
    calibration: CalibrationSet,
    progress: Progress | None = None,
    should_cancel: CancelCheck | None = None,
    batch_size: int = 16,
) -> QuantizeReport:
    """Quantize `model` in place following `recipe`, calibrated on `calibration`. `batch_size` is the
    rows per forward of the staged mode; the official mode uses the family's."""
    model.eval()
    # quantizers and tables created by the passes belong on the model's device
    with torch.device(next(model.parameters()).device):
        return _quantize(model, recipe, calibration, progress, should_cancel, batch_size)


def _quantize(model, recipe, calibration, progress, should_cancel, batch_size) -> QuantizeReport:
    layout = layout_of(model)
    plan = plan_calibration(recipe.calibration, layout, batch_size)
    ctx = PassContext(model, layout, calibration, recipe, plan, progress, should_cancel)
    report = QuantizeReport(recipe=recipe, layers={}, plan=plan)
    swap_in_quant_modules(ctx)
    for config in recipe.passes:
        if config.role != "transform":
            continue  # granularity passes act through ctx.final_act_quantizer
        start = time.perf_counter()
        report.scales[config.kind] = handler_for(config).run(ctx)
        report.stages.append({"stage": config.kind, "seconds": round(time.perf_counter() - start, 3)})
    start = time.perf_counter()
    calibrate_final(ctx)
    report.stages.append({"stage": "calibrate", "seconds": round(time.perf_counter() - start, 3)})
    report.layers = describe_quant_modules(model)
    return report


def rebuild_structure(model: nn.Module, layers: dict[str, dict], state: dict[str, torch.Tensor]) -> nn.Module:
    """Give an FP model the structure of a quantized one, so that `state` loads strictly into it.

    Quantized modules are rebuilt from their descriptions; buffers that folding turned from None into
    tensors (a norm's bias, AdaLN's `one`) are re-created with the saved shapes.
    """
    from quantcore.quant.modules import build_quant_module

    for name, desc in layers.items():
        swap_module(model, name, build_quant_module(desc))
    expected = model.state_dict().keys()
    for key in state.keys() - expected:
        owner_path, _, attr = key.rpartition(".")
        owner = model.get_submodule(owner_path)
        if attr in owner._buffers and owner._buffers[attr] is None:
            setattr(owner, attr, torch.zeros_like(state[key]))
    return model
