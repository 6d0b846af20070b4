"""`quantize(model, recipe, calibration)`: run a recipe's passes on a model, in place.

Every pass reads the family's `QuantLayout` and folds what it computes into the producer of each
linear's input, so the quantized model computes nothing extra at run time. Order (official):
SmoothQuant -> symmetric shift -> GPS, each on the activations the previous one left, then the final
calibration of weights (per output row) and activations (per tensor, STWQ tables or dynamic per
token). Sink tokens stay out of the smoothing statistics (reference §4, pitfall 3).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from quantcore.calib.pool import CalibrationSet, CancelCheck, Progress, check_cancel
from quantcore.methods.smoothing import GPSStats, gps_scales, smoothquant_scales, symmetric_shift
from quantcore.models import family_module
from quantcore.quant.layout import FoldSite, QuantLayout, fold_scale, fold_shift
from quantcore.quant.modules import (
    QuantLinear,
    QuantMatMul,
    calibrate_weights,
    describe_quant_modules,
    finalize_calibration,
    make_act_quantizer,
    set_quant_mode,
    swap_module,
)
from quantcore.quant.quantizer import UniformQuantizer
from quantcore.recipe import Recipe


def layout_of(model: nn.Module) -> QuantLayout:
    return family_module(model.family).quant_layout(model)


@dataclass
class QuantizeReport:
    recipe: Recipe
    layers: dict[str, dict]
    stages: list[dict] = field(default_factory=list)
    scales: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "recipe": self.recipe.model_dump(mode="json"),
            "layers": self.layers,
            "stages": self.stages,
            "scales": self.scales,
        }


class _Runner:
    """Mini-batch sweeps over the calibration set with progress, cancel checks and input hooks."""

    def __init__(self, model, layout, calibration: CalibrationSet, batch_size, progress, should_cancel):
        self.model, self.calibration, self.batch_size = model, calibration, batch_size
        self.fold_sites = layout.fold_sites
        self.progress, self.should_cancel = progress, should_cancel

    @torch.no_grad()
    def sweep(self, stage: str) -> None:
        total = max(1, -(-len(self.calibration) // self.batch_size))
        for i, (classes, tokens) in enumerate(self.calibration.batches(self.batch_size)):
            check_cancel(self.should_cancel, stage)
            self.model.sequence_logits(classes, tokens)
            if self.progress:
                self.progress(stage, (i + 1) / total)

    def layer_done(self, stage: str, site: FoldSite, index: int) -> None:
        """Per-layer progress while a pass folds its results, layer by layer."""
        if self.progress:
            total = len(self.fold_sites)
            self.progress(f"{stage}-fold {site.linears[0]}", (index + 1) / total)

    @contextmanager
    def inputs(self, names, fn):
        """Call fn(name, x, pos) with the input of each named module on every forward."""
        handles = [
            self.model.get_submodule(n).register_forward_pre_hook(
                lambda m, args, n=n: fn(n, args[0], args[1])
            )
            for n in names
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def _non_sink(x: torch.Tensor, pos: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """(N, C) rows of x at positions that are not sinks."""
    keep = ~torch.isin(pos, sinks.to(pos.device))
    return x[..., keep, :].reshape(-1, x.shape[-1])


def swap_in_quant_modules(model: nn.Module, layout: QuantLayout, recipe: Recipe) -> None:
    a_bits = recipe.a_bits or recipe.w_bits
    for name in layout.all_linears:
        swap_module(model, name, QuantLinear.from_linear(model.get_submodule(name), recipe.w_bits, a_bits))
    if recipe.a_bits is not None and recipe.quantize_attention:
        for name in layout.matmuls:
            log_probs = layout.log_sqrt2_probs and name in layout.prob_matmuls
            swap_module(
                model, name, QuantMatMul.from_bits(recipe.a_bits, recipe.a_bits, a_log_sqrt2=log_probs)
            )
    set_quant_mode(model, weights="off", acts="off")


def _lead(model, site: FoldSite) -> QuantLinear:
    return model.get_submodule(site.linears[0])


def _channel_calibrate(model, layout, runner, a_bits, stage, pcts) -> None:
    """Per-input-channel quantizers on every fold site's input, calibrated without the sinks."""
    set_quant_mode(model, weights="off", acts="off")
    for site in layout.fold_sites:
        lead = _lead(model, site)
        q = UniformQuantizer(a_bits, "channel", channels=lead.in_features, pcts=pcts)
        q.set_passthrough(layout.sink_positions)
        q.set_mode("calibrate")
        lead.input_quantizer = q
    runner.sweep(stage)
    for site in layout.fold_sites:
        _lead(model, site).input_quantizer.finalize()


def pass_smoothquant(model, layout, runner, recipe, alpha: float) -> dict:
    sinks = torch.tensor(layout.sink_positions)
    absmax: dict[str, torch.Tensor] = {}

    def observe(name, x, pos):
        m = _non_sink(x, pos, sinks).abs().amax(dim=0).float()
        absmax[name] = m if name not in absmax else torch.maximum(absmax[name], m)

    set_quant_mode(model, weights="off", acts="off")
    with runner.inputs([s.linears[0] for s in layout.fold_sites], observe):
        runner.sweep("smoothquant")
    summary = {}
    for i, site in enumerate(layout.fold_sites):
        s = smoothquant_scales(absmax[site.linears[0]], _lead(model, site).weight, alpha)
        fold_scale(model, site, s)
        summary[site.linears[0]] = {"min": float(s.min()), "max": float(s.max())}
        runner.layer_done("smoothquant", site, i)
    return summary


def pass_shift(model, layout, runner, recipe) -> dict:
    _channel_calibrate(model, layout, runner, recipe.a_bits, "shift", recipe.percentiles)
    summary = {}
    for i, site in enumerate(layout.fold_sites):
        q = _lead(model, site).input_quantizer
        p = symmetric_shift(q.scale, q.zero_point, recipe.a_bits)
        fold_shift(model, site, p)
        summary[site.linears[0]] = {"abs_max": float(p.abs().max())}
        runner.layer_done("shift", site, i)
    return summary


def pass_gps(model, layout, runner, recipe, shared: str) -> dict:
    _channel_calibrate(model, layout, runner, recipe.a_bits, "gps-ranges", recipe.percentiles)
    sinks = torch.tensor(layout.sink_positions)
    stats = {}
    for site in layout.fold_sites:
        if site.gps:
            q = _lead(model, site).input_quantizer
            stats[site.linears[0]] = GPSStats(
                q.scale, q.zero_point, q.observed_min, q.observed_max, recipe.a_bits
            )
    set_quant_mode(model, weights="off", acts="off")
    with runner.inputs(list(stats), lambda name, x, pos: stats[name].update(_non_sink(x, pos, sinks))):
        runner.sweep("gps")
    summary = {}
    for i, site in enumerate(layout.fold_sites):
        runner.layer_done("gps", site, i)
        if not site.gps:
            continue
        linears = [model.get_submodule(n) for n in site.linears]
        for linear in linears:
            linear.calibrate_weight()
        s = gps_scales(
            stats[site.linears[0]],
            [m.weight for m in linears],
            [m.quantized_weight() for m in linears],
            shared,
        )
        fold_scale(model, site, s)
        summary[site.linears[0]] = {
            "anchor": stats[site.linears[0]].anchor,
            "min": float(s.min()),
            "max": float(s.max()),
        }
    return summary


def _final_act_quantizer(layout: QuantLayout, recipe: Recipe, name: str, head: bool) -> UniformQuantizer:
    stwq, dynamic = recipe.has("stwq"), recipe.has("dynamic_token")
    if head:  # the LM head's input stays per-tensor (reference §4, PAR/VAR)
        return make_act_quantizer(recipe.a_bits, "tensor", pcts=recipe.percentiles)
    if dynamic:
        return make_act_quantizer(recipe.a_bits, "dynamic_token")
    if stwq:
        table = layout.groups_for(name, per_position=stwq.mode == "per_position")
        if int(table.max()) > 0:
            return make_act_quantizer(
                recipe.a_bits, "group", group_of_position=table, pcts=recipe.percentiles
            )
    return make_act_quantizer(recipe.a_bits, "tensor", pcts=recipe.percentiles)


def calibrate_final(model, layout, runner, recipe) -> None:
    """Weights per output row; activations with their final granularity, observed on the folded model."""
    calibrate_weights(model)
    set_quant_mode(model, weights="on", acts="off")
    if recipe.a_bits is None:
        return
    heads = {name for site in layout.fold_sites if site.head for name in site.linears}
    for name in layout.all_linears:
        model.get_submodule(name).input_quantizer = _final_act_quantizer(layout, recipe, name, name in heads)
    set_quant_mode(model, acts="calibrate")
    runner.sweep("calibrate")
    finalize_calibration(model)
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
    """Quantize `model` in place following `recipe`, calibrated on `calibration`."""
    model.eval()
    # quantizers and tables created by the passes belong on the model's device
    with torch.device(next(model.parameters()).device):
        return _quantize(model, recipe, calibration, progress, should_cancel, batch_size)


def _quantize(model, recipe, calibration, progress, should_cancel, batch_size) -> QuantizeReport:
    layout = layout_of(model)
    runner = _Runner(model, layout, calibration, batch_size, progress, should_cancel)
    report = QuantizeReport(recipe=recipe, layers={})
    swap_in_quant_modules(model, layout, recipe)
    for p in recipe.passes:
        start = time.perf_counter()
        if p.kind == "smoothquant":
            report.scales["smoothquant"] = pass_smoothquant(model, layout, runner, recipe, p.alpha)
        elif p.kind == "shift":
            report.scales["shift"] = pass_shift(model, layout, runner, recipe)
        elif p.kind == "gps":
            report.scales["gps"] = pass_gps(model, layout, runner, recipe, p.shared)
        else:
            continue  # stwq / dynamic_token choose the final granularity
        report.stages.append({"stage": p.kind, "seconds": round(time.perf_counter() - start, 3)})
    start = time.perf_counter()
    calibrate_final(model, layout, runner, recipe)
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
