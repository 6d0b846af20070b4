"""Quantized drop-in replacements for `quantcore.nn.Linear` and `quantcore.nn.MatMul`, and the mode API.

A model is calibrated in three explicit steps:

    calibrate_weights(model)                  # per-row weight params from the current weights
    set_quant_mode(model, acts="calibrate")   # forward mini-batches: activations observed, FP output
    finalize_calibration(model)               # range search for every observing quantizer
    set_quant_mode(model, weights="on", acts="on")

`describe_quant_modules(model)` gives a JSON-able description per module; `build_quant_module`
rebuilds an empty module of the same structure so a saved state_dict loads into it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from quantcore.errors import ConfigError, QuantcoreError
from quantcore.nn import Linear
from quantcore.quant.quantizer import (
    MODES,
    LogSqrt2Quantizer,
    UniformQuantizer,
    build_quantizer,
    tracing_or_capturing,
)

Quantizer = UniformQuantizer | LogSqrt2Quantizer


def make_act_quantizer(
    n_bits: int,
    granularity: str = "tensor",
    *,
    channels: int | None = None,
    group_of_position: torch.Tensor | None = None,
    log_sqrt2: bool = False,
    **kwargs,
) -> Quantizer:
    """An activation quantizer of any granularity (or per-tensor log-sqrt2 for probabilities)."""
    if log_sqrt2:
        if granularity != "tensor":
            raise ConfigError(f"the log-sqrt2 quantizer is per-tensor only, got granularity {granularity!r}")
        return LogSqrt2Quantizer(n_bits, **kwargs)
    if granularity == "row":
        raise ConfigError(
            "granularity 'row' is for weights; activations use tensor/channel/group/dynamic_token"
        )
    return UniformQuantizer(
        n_bits, granularity, channels=channels, group_of_position=group_of_position, **kwargs
    )


class QuantLinear(nn.Module):
    """A linear layer with a per-row weight quantizer and an input quantizer; forward(x, pos=None)."""

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        weight_quantizer: UniformQuantizer,
        input_quantizer: Quantizer,
    ):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        # Fake-quantized weight and the version of (weight, params) it was computed from.
        self._wq_cache: torch.Tensor | None = None
        self._wq_key: tuple | None = None
        # The integer weight codes an artifact stored (uint8, (N, K)) and the weight key they belong to:
        # the real modules are built from them while the weight is the loaded one (stored_codes()).
        self._stored: tuple[torch.Tensor, tuple] | None = None

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @classmethod
    def from_linear(
        cls,
        linear: Linear | nn.Linear,
        w_bits: int,
        a_bits: int,
        act_granularity: str = "tensor",
        **act_kwargs,
    ) -> QuantLinear:
        """Wrap `linear`, sharing its weight and bias Parameters (no copy)."""
        wq = UniformQuantizer(w_bits, "row", channels=linear.out_features)
        if act_granularity == "channel":
            act_kwargs.setdefault("channels", linear.in_features)
        aq = make_act_quantizer(a_bits, act_granularity, **act_kwargs)
        return cls(linear.weight, linear.bias, wq, aq)

    @property
    def weight_quant(self) -> bool:
        return self.weight_quantizer.mode == "on"

    @weight_quant.setter
    def weight_quant(self, on: bool) -> None:
        self.weight_quantizer.set_mode("on" if on else "off")

    @property
    def act_quant(self) -> bool:
        return self.input_quantizer.mode == "on"

    @act_quant.setter
    def act_quant(self, on: bool) -> None:
        self.input_quantizer.set_mode("on" if on else "off")

    def calibrate_weight(self) -> None:
        """Per-row range search on the current weight. Call again after a pass rescales the weight."""
        wq = self.weight_quantizer
        wq.reset_stats()
        wq.observe(self.weight)
        wq.finalize()
        wq.reset_stats()

    def _weight_key(self) -> tuple:
        """What the weight's codes depend on: in-place edits (not through `.data`) and load_state_dict
        bump a tensor's _version; .to() changes its data_ptr."""
        wq = self.weight_quantizer
        return tuple((t._version, t.data_ptr()) for t in (self.weight, wq.scale, wq.zero_point))

    def keep_stored_codes(self, codes: torch.Tensor) -> None:
        """Keep an artifact's integer codes of the weight as it is now (its loader calls this)."""
        self._stored = (codes, self._weight_key())

    def stored_codes(self) -> torch.Tensor | None:
        """The kept codes, or None once the weight or its quantizer's parameters changed since."""
        if self._stored is None or self._stored[1] != self._weight_key():
            return None
        return self._stored[0]

    def quantized_weight(self) -> torch.Tensor:
        """Fake-quantized weight, recomputed only when the weight or its parameters changed."""
        wq = self.weight_quantizer
        if not tracing_or_capturing() and not bool(wq.initialized):
            raise QuantcoreError("weight quantizer is on but not calibrated; call calibrate_weight() first")
        if torch.compiler.is_compiling():
            # A compiled graph keeps its weights fixed: it reads the cache the eager warm-up filled (or
            # traces the quantize op); the version key below cannot be traced (data-dependent guard).
            return (
                self._wq_cache
                if self._wq_cache is not None
                else wq.quantize(self.weight, None).to(self.weight.dtype)
            )
        key = self._weight_key()
        if self._wq_key != key:
            with torch.no_grad():
                self._wq_cache = wq.quantize(self.weight, None).to(self.weight.dtype)
            self._wq_key = key
        return self._wq_cache

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        x = self.input_quantizer(x, pos)
        mode = self.weight_quantizer.mode
        if mode == "calibrate":
            raise ConfigError(
                "weight quantizers are calibrated with calibrate_weight(), not by forward passes"
            )
        weight = self.quantized_weight() if mode == "on" else self.weight
        return F.linear(x, weight, self.bias)

    def describe(self) -> dict:
        return {
            "kind": "linear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "weight": self.weight_quantizer.describe(),
            "input": self.input_quantizer.describe(),
        }

    def extra_repr(self) -> str:
        w, a = self.weight_quantizer, self.input_quantizer
        return (
            f"in={self.in_features}, out={self.out_features}, W{w.n_bits}:{w.mode}, "
            f"A{a.n_bits}:{a.granularity}:{a.mode}"
        )


class QuantMatMul(nn.Module):
    """`a @ b` with a quantizer on each operand (per-tensor uniform by default); no `a_quantizer` leaves
    the first operand (queries, probabilities) as it is, so only K and V are quantized."""

    def __init__(self, a_quantizer: Quantizer | None, b_quantizer: Quantizer):
        super().__init__()
        self.a_quantizer = a_quantizer
        self.b_quantizer = b_quantizer

    @classmethod
    def from_bits(cls, a_bits: int, b_bits: int, a_log_sqrt2: bool = False) -> QuantMatMul:
        """Replacement for a `MatMul`; `a_log_sqrt2=True` puts log-sqrt2 on the probability operand."""
        return cls(make_act_quantizer(a_bits, log_sqrt2=a_log_sqrt2), make_act_quantizer(b_bits))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a if self.a_quantizer is None else self.a_quantizer(a)) @ self.b_quantizer(b)

    def describe(self) -> dict:
        a = None if self.a_quantizer is None else self.a_quantizer.describe()
        return {"kind": "matmul", "a": a, "b": self.b_quantizer.describe()}


def build_quant_module(desc: dict) -> QuantLinear | QuantMatMul:
    """An uncalibrated module with the parameter and buffer shapes of `desc`, for load_state_dict."""
    kind = desc.get("kind")
    if kind == "matmul":
        a = None if desc["a"] is None else build_quantizer(desc["a"])
        return QuantMatMul(a, build_quantizer(desc["b"]))
    if kind != "linear":
        raise ConfigError(f"unknown quantized module kind {kind!r}")
    weight = nn.Parameter(torch.zeros(desc["out_features"], desc["in_features"]))
    bias = nn.Parameter(torch.zeros(desc["out_features"])) if desc["bias"] else None
    return QuantLinear(weight, bias, build_quantizer(desc["weight"]), build_quantizer(desc["input"]))


def iter_quant_modules(model: nn.Module) -> Iterator[tuple[str, QuantLinear | QuantMatMul]]:
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear | QuantMatMul):
            yield name, module


def _act_quantizers(module: QuantLinear | QuantMatMul) -> list[Quantizer]:
    if isinstance(module, QuantLinear):
        return [module.input_quantizer]
    return [q for q in (module.a_quantizer, module.b_quantizer) if q is not None]


def set_quant_mode(model: nn.Module, weights: str | None = None, acts: str | None = None) -> None:
    """Set every weight quantizer to `weights` ("off"/"on") and every activation quantizer to `acts`
    ("off"/"calibrate"/"on"); None leaves that side unchanged. Entering "calibrate" resets statistics."""
    if weights is not None and weights not in ("off", "on"):
        raise ConfigError(f"weights mode must be 'off' or 'on', got {weights!r} (use calibrate_weights)")
    if acts is not None and acts not in MODES:
        raise ConfigError(f"acts mode must be one of {MODES}, got {acts!r}")
    for _, module in iter_quant_modules(model):
        if weights is not None and isinstance(module, QuantLinear):
            module.weight_quantizer.set_mode(weights)
        if acts is not None:
            for q in _act_quantizers(module):
                q.set_mode(acts)


def calibrate_weights(model: nn.Module) -> int:
    """Per-row weight calibration of every QuantLinear; returns how many were calibrated."""
    count = 0
    for _, module in iter_quant_modules(model):
        if isinstance(module, QuantLinear):
            module.calibrate_weight()
            count += 1
    return count


def finalize_calibration(model: nn.Module) -> int:
    """Finalize every activation quantizer that is in "calibrate" mode; returns how many."""
    count = 0
    for _, module in iter_quant_modules(model):
        for q in _act_quantizers(module):
            if q.mode == "calibrate":
                q.finalize()
                count += 1
    return count


def describe_quant_modules(model: nn.Module) -> dict[str, dict]:
    return {name: module.describe() for name, module in iter_quant_modules(model)}


def swap_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule at dotted `name` with `new`; returns the old one."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
