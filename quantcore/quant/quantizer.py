"""Quantizers: asymmetric uniform (per tensor, row, channel, position group, dynamic token) and log-sqrt2.

Every quantizer has a mode: "off" passes x through, "calibrate" observes x (streaming, bounded memory)
and passes it through, "on" fake-quantizes, and "init" (the official code's sequential calibration)
takes its parameters from the input of the forward it is in, then fake-quantizes that input, so later
layers see quantized inputs; with `ema` set, each later forward moves the parameters by
p <- ema * p + (1 - ema) * p_batch (zero-points rounded back to integers), else the first forward fixes
them. Calibration keeps, per parameter slot, the exact running min/max and a seeded reservoir sample;
`finalize()` runs the percentile+MSE range search on the sample.
Parameters are plain buffers, so a state_dict of a quantizer loads into a fresh one built from
`describe()`.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import nn

from quantcore.errors import ConfigError, QuantcoreError

DEFAULT_PCTS: tuple[float, ...] = (0.999, 0.9999, 0.99999)
GRANULARITIES = ("tensor", "row", "channel", "group", "dynamic_token")
MODES = ("off", "calibrate", "on", "init")

# Reservoir budget: values kept per calibration slot, and in total over the slots of one quantizer.
SAMPLE_PER_SLOT = 2**16
SAMPLE_TOTAL = 2**25
# Elements sorted at once by the range search (rows are processed in chunks of this size).
SEARCH_CHUNK = 2**22
# Smallest step size, so a constant slice never divides by zero.
MIN_SCALE = 1e-8


def check_bits(n_bits: int) -> int:
    if not isinstance(n_bits, int) or isinstance(n_bits, bool) or not 2 <= n_bits <= 8:
        raise ConfigError(f"n_bits must be an integer in 2..8, got {n_bits!r}")
    return n_bits


def tracing_or_capturing() -> bool:
    """Inside torch.compile tracing or a CUDA-graph capture, where reading a tensor flag on the host
    would break the graph (checked once outside, on the warm-up call)."""
    if torch.compiler.is_compiling():
        return True
    return _cuda_available() and torch.cuda.is_current_stream_capturing()


@functools.cache
def _cuda_available() -> bool:  # asked on every quantizer forward: ask the driver once
    return torch.cuda.is_available()


def quantize_codes(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, n_bits: int
) -> torch.Tensor:
    """The integer codes clamp(round(x / s) + z, 0, 2^b - 1), as float; s and z broadcast against x.
    The one rounding every path shares: simulation, the integer kernels, stored weights, the KV cache."""
    return torch.clamp(torch.round(x / scale) + zero_point, 0, 2**n_bits - 1)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """(q - z) * s, as float."""
    return (codes.float() - zero_point) * scale


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Asymmetric uniform quantize-dequantize; `scale` and `zero_point` broadcast against `x`."""
    return dequantize_codes(quantize_codes(x, scale, zero_point, n_bits), scale, zero_point)


RECOMPILE_LIMIT = 64


def allow_recompiles() -> None:
    """Raise Dynamo's recompile limit (8 graphs per function) to RECOMPILE_LIMIT for the process, once per
    compiled function, not patched per call (a config patch costs ~16 µs): a static-shape compile makes one
    graph per input shape (VAR: ten scales per batch size), a dynamic one per rank, dtype and bit width."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)


class FusedOnGPU:
    """`fn` as written on the CPU; on CUDA tensors its `torch.compile` twin, which Inductor fuses into one
    kernel per reduction. Run eagerly, a quantize step is ~6 passes over the activation (cast, divide,
    round, shift, clamp, cast back) and on the GPU costs more than an 8-bit GEMM saves.

    Rows are dynamic, so one compile serves every batch size and VAR scale; each other signature (rank,
    dtype, bits) is one more graph (`allow_recompiles`). Inside an outer compiled region `fn` is traced as
    it is, and fused there.
    Division is IEEE-rounded as in eager (Triton's `/` is not): codes at a rounding midpoint must not move.
    """

    def __init__(self, fn):
        self.eager = fn

    @functools.cached_property
    def compiled(self):
        """Made on first use: torch.compile imports Dynamo, which the CPU-only CLI should not pay for."""
        if not _inductor_rounds_division():  # this torch cannot round division as eager does: stay eager
            return self.eager
        allow_recompiles()
        return torch.compile(self.eager, dynamic=True, options={"eager_numerics.division_rounding": True})

    def __call__(self, x: torch.Tensor, *args):
        if not x.is_cuda or torch.compiler.is_compiling():
            return self.eager(x, *args)
        return self.compiled(x, *args)


def _inductor_rounds_division() -> bool:
    """Whether this torch's Inductor can emit IEEE division (`eager_numerics.division_rounding`)."""
    from torch._inductor import config

    return hasattr(getattr(config, "eager_numerics", None), "division_rounding")


def _fake_quant_input(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, n_bits: int
) -> torch.Tensor:
    return fake_quant(x.float(), scale, zero_point, n_bits).to(x.dtype)


fake_quant_input = FusedOnGPU(_fake_quant_input)


def params_from_range(
    lo: torch.Tensor, hi: torch.Tensor, n_bits: int, include_zero: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, integer zero_point) that map [lo, hi] onto 0..2^b-1."""
    lo, hi = lo.float(), hi.float()
    # A constant slice gets a range that reaches 0, so the constant itself is representable.
    flat = hi <= lo
    if include_zero:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    else:
        lo, hi = torch.where(flat, lo.clamp(max=0), lo), torch.where(flat, hi.clamp(min=0), hi)
    scale = ((hi - lo) / (2**n_bits - 1)).clamp(min=MIN_SCALE)
    zero_point = torch.round(-lo / scale)
    return scale, zero_point


def sorted_quantile(sorted_x: torch.Tensor, q: float) -> torch.Tensor:
    """Quantile of each row of an already sorted (R, K) tensor, linear interpolation like torch.quantile."""
    k = sorted_x.shape[-1]
    pos = q * (k - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, k - 1)
    frac = pos - lo
    return sorted_x[:, lo] + (sorted_x[:, hi] - sorted_x[:, lo]) * frac


def search_range(
    x: torch.Tensor,
    n_bits: int,
    pcts: Sequence[float] = DEFAULT_PCTS,
    include_zero: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile+MSE range search, one per row of a 2-D (R, K) tensor.

    For each pct the candidate range is [quantile(1-pct), quantile(pct)]; the candidate with the
    least mean squared fake-quant error on that row wins (ties keep the earlier pct). Rows are
    sorted in chunks, so memory stays bounded; callers subsample huge rows first.
    """
    if x.dim() != 2 or x.shape[1] == 0:
        raise ConfigError(f"search_range needs a non-empty 2-D (rows, samples) tensor, got {tuple(x.shape)}")
    rows_per_chunk = max(1, SEARCH_CHUNK // x.shape[1])
    scales, zero_points = [], []
    for chunk in x.float().split(rows_per_chunk):
        s, z = _search_chunk(chunk, n_bits, pcts, include_zero)
        scales.append(s)
        zero_points.append(z)
    return torch.cat(scales), torch.cat(zero_points)


def _search_chunk(
    x: torch.Tensor, n_bits: int, pcts: Sequence[float], include_zero: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    sorted_x = x.sort(dim=1).values
    best_err = torch.full((x.shape[0],), math.inf, device=x.device)
    best_scale = torch.empty(x.shape[0], device=x.device)
    best_zp = torch.empty(x.shape[0], device=x.device)
    for pct in pcts:
        hi = sorted_quantile(sorted_x, pct)
        lo = sorted_quantile(sorted_x, 1.0 - pct)
        scale, zp = params_from_range(lo, hi, n_bits, include_zero)
        err = (fake_quant(x, scale[:, None], zp[:, None], n_bits) - x).square().mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp


class Reservoir:
    """A seeded uniform sample of at most `size` columns from a stream of (R, m) blocks.

    Every column gets a uniform random key and the `size` smallest keys are kept (a priority-sample
    form of reservoir sampling), so the R rows share one column sample and the result depends only
    on the seed and the stream, never on thread timing.
    """

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self._gen: torch.Generator | None = None

    def add(self, values: torch.Tensor) -> None:
        values = values.float()
        if self._gen is None:
            self._gen = torch.Generator(device=values.device).manual_seed(self.seed)
        new_keys = torch.rand(values.shape[1], generator=self._gen, device=values.device)
        if self.keys is None:
            old_keys, old_values = new_keys[:0], values[:, :0]
        else:
            old_keys, old_values = self.keys, self.values
        # Once full, only new columns whose key beats the current worst key can enter.
        if old_keys.numel() >= self.size:
            enter = new_keys < old_keys.max()
            new_keys, values = new_keys[enter], values[:, enter]
        keys = torch.cat([old_keys, new_keys])
        if keys.numel() <= self.size:
            self.keys, self.values = keys, torch.cat([old_values, values], dim=1)
            return
        keep = torch.topk(keys, self.size, largest=False).indices.sort().values
        n_old = old_keys.numel()
        keep_old, keep_new = keep[keep < n_old], keep[keep >= n_old] - n_old
        self.keys = keys[keep]
        self.values = torch.cat([old_values[:, keep_old], values[:, keep_new]], dim=1)


class _Stats:
    """Calibration state of one quantizer: exact running min/max per slot plus reservoirs."""

    def __init__(self, num_slots: int, reservoirs: list[Reservoir]):
        self.num_slots = num_slots
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.count = torch.zeros(num_slots, dtype=torch.long)
        self.reservoirs = reservoirs

    def update_range(self, slots: torch.Tensor | slice, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.min is None:
            self.min = torch.full((self.num_slots,), math.inf, device=lo.device)
            self.max = torch.full((self.num_slots,), -math.inf, device=lo.device)
        self.min[slots] = torch.minimum(self.min[slots], lo.float())
        self.max[slots] = torch.maximum(self.max[slots], hi.float())


class _ObservingQuantizer(nn.Module, ABC):
    """Mode switch, sink pass-through and streaming statistics shared by the static quantizers.

    Subclasses say how a mini-batch is observed, how calibration ends and how a tensor is quantized."""

    kind = "base"
    param_names: tuple[str, ...] = ()  # the calibrated buffers ("init" mode averages them)

    def __init__(self, n_bits: int, granularity: str, num_params: int, sample_size: int | None, seed: int):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ConfigError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")
        self.n_bits = check_bits(n_bits)
        self.granularity = granularity
        self.seed = seed
        self.mode = "off"
        # Positions left in FP and kept out of the statistics (the sink-aware intermediate stage).
        self.passthrough: torch.Tensor | None = None
        if sample_size is None:
            sample_size = max(1024, min(SAMPLE_PER_SLOT, SAMPLE_TOTAL // max(num_params, 1)))
        self.sample_size = sample_size
        self._stats: _Stats | None = None
        self.register_buffer("initialized", torch.tensor(False))
        self.ema: float | None = None  # "init" mode: momentum of the running average over forwards
        self._init_forwards = 0

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ConfigError(f"unknown quantizer mode {mode!r}; expected one of {MODES}")
        if mode == "calibrate" and self.mode != "calibrate":
            self.reset_stats()
        if mode == "init":
            self._init_forwards = 0
        self.mode = mode

    def invalidate(self) -> None:
        """Mark the parameters stale (a pass changed what this quantizer sees): "init" sets them again."""
        self.initialized.fill_(False)

    def _init_from(self, x: torch.Tensor, pos: torch.Tensor | None) -> None:
        """Parameters from this forward's input, blended into the earlier forwards' with `ema`."""
        if self._init_forwards and self.ema is None:
            return  # the first forward fixed them
        previous = [getattr(self, name).clone() for name in self.param_names] if self._init_forwards else None
        self.reset_stats()
        self.observe(x, pos)
        self.finalize()
        if previous is not None:
            for name, old in zip(self.param_names, previous, strict=True):
                new = getattr(self, name)
                blended = self.ema * old.double() + (1 - self.ema) * new.double()
                new.copy_(blended.round() if not new.is_floating_point() else blended)
        self._init_forwards += 1

    def set_passthrough(self, positions: Sequence[int] | torch.Tensor | None) -> None:
        """Leave tokens at these absolute positions in FP and out of the statistics (None clears)."""
        self.passthrough = None if positions is None else torch.as_tensor(positions, dtype=torch.long)

    def reset_stats(self) -> None:
        self._stats = None

    @property
    def observed_min(self) -> torch.Tensor:
        """Exact minimum per parameter slot over everything observed since the last reset."""
        return self._require_stats().min

    @property
    def observed_max(self) -> torch.Tensor:
        return self._require_stats().max

    def _require_stats(self) -> _Stats:
        if self._stats is None or self._stats.min is None:
            raise QuantcoreError(f"{self.kind} quantizer has observed nothing; call observe() first")
        return self._stats

    def _kept_tokens(self, x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor | None:
        """Bool mask (T,) of tokens that are quantized, or None when all are."""
        if self.passthrough is None or self.passthrough.numel() == 0:
            return None
        if pos is None:
            raise ConfigError("this quantizer passes sink positions through in FP, so forward needs `pos`")
        if pos.numel() != x.shape[-2]:
            raise ConfigError(f"pos has {pos.numel()} entries but x has {x.shape[-2]} tokens along dim -2")
        return ~torch.isin(pos, self.passthrough.to(pos.device))

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "calibrate":
            self.observe(x, pos)
            return x
        if self.mode == "init":
            self._init_from(x, pos)
        if not tracing_or_capturing() and not bool(self.initialized):
            raise QuantcoreError(f"{self.kind} quantizer is on but not calibrated; call finalize() first")
        kept = self._kept_tokens(x, pos)
        xq = self.quantize(x, pos).to(x.dtype)
        if kept is None:
            return xq
        return torch.where(kept.to(x.device)[:, None], xq, x)

    @abstractmethod
    def observe(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> None: ...

    @abstractmethod
    def quantize(self, x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor: ...

    @abstractmethod
    def finalize(self) -> None: ...

    def _observe_rows(self, slot: int | slice, rows: torch.Tensor) -> None:
        """Feed an (R, m) block to reservoir `slot` (an int for group slots, a slice for row/channel)."""
        stats = self._stats
        if rows.shape[1] == 0:
            return
        stats.update_range(slot, rows.amin(dim=1), rows.amax(dim=1))
        stats.count[slot] += rows.shape[1]
        stats.reservoirs[slot if isinstance(slot, int) else 0].add(rows)


class UniformQuantizer(_ObservingQuantizer):
    """Asymmetric uniform quantizer with static (calibrated) or dynamic per-token parameters.

    Granularities (x is (..., T, C) for activations, (out, in) for weights):
      "tensor"         one (scale, zp);
      "row"            one per output channel of a weight (dim 0), `channels` = out_features;
      "channel"        one per input channel (dim -1), statistics over all tokens; a calibration tool;
      "group"          static per position group: `group_of_position[p]` is the group of absolute
                       position p (positions past the table use its last entry), `scale[G]`;
      "dynamic_token"  per-token min/max at run time, nothing calibrated.
    """

    kind = "uniform"
    param_names = ("scale", "zero_point")

    def __init__(
        self,
        n_bits: int,
        granularity: str = "tensor",
        *,
        channels: int | None = None,
        group_of_position: torch.Tensor | None = None,
        num_groups: int | None = None,
        pcts: Sequence[float] = DEFAULT_PCTS,
        include_zero: bool = False,
        sample_size: int | None = None,
        seed: int = 0,
    ):
        num_params = _num_params(granularity, channels, group_of_position, num_groups)
        super().__init__(n_bits, granularity, num_params, sample_size, seed)
        self.pcts = tuple(pcts)
        self.include_zero = include_zero
        self.register_buffer("scale", torch.ones(num_params))
        self.register_buffer("zero_point", torch.zeros(num_params, dtype=torch.int32))
        if granularity == "group":
            self.register_buffer("group_of_position", group_of_position.to(torch.long).clone())
        if granularity == "dynamic_token":
            self.initialized.fill_(True)

    @property
    def num_params(self) -> int:
        return self.scale.numel()

    def invalidate(self) -> None:
        if self.granularity != "dynamic_token":  # nothing calibrated, nothing to go stale
            super().invalidate()

    def describe(self) -> dict:
        desc = {
            "kind": self.kind,
            "bits": self.n_bits,
            "granularity": self.granularity,
            "num_groups": self.num_params,
            "include_zero": self.include_zero,
        }
        if self.granularity == "group":
            desc["num_positions"] = self.group_of_position.numel()
        return desc

    def reset_stats(self) -> None:
        if self.granularity == "group":
            reservoirs = [Reservoir(self.sample_size, self.seed + g) for g in range(self.num_params)]
        else:
            reservoirs = [Reservoir(self.sample_size, self.seed)]
        self._stats = _Stats(self.num_params, reservoirs)

    def groups_of(self, pos: torch.Tensor) -> torch.Tensor:
        table = self.group_of_position
        return table[pos.to(table.device).clamp(0, table.numel() - 1)]

    def observe(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> None:
        """Add one mini-batch to the running statistics (sink positions excluded)."""
        if self.granularity == "dynamic_token":
            return
        if self._stats is None:
            self.reset_stats()
        x = x.detach()
        if self.granularity == "row":
            self._observe_rows(slice(None), x.reshape(x.shape[0], -1))
            return
        kept = self._kept_tokens(x, pos)
        if self.granularity == "group":
            if pos is None:
                raise ConfigError("a group (static token-wise) quantizer needs `pos` to calibrate")
            groups = self.groups_of(pos).to(x.device)
            if kept is not None:
                groups = torch.where(kept.to(x.device), groups, -1)
            for g in torch.unique(groups[groups >= 0]).tolist():
                self._observe_rows(g, x[..., groups == g, :].reshape(1, -1))
            return
        if kept is not None:
            x = x[..., kept.to(x.device), :]
        if self.granularity == "channel":
            self._observe_rows(slice(None), x.reshape(-1, x.shape[-1]).T)
        else:
            self._observe_rows(slice(None), x.reshape(1, -1))

    def finalize(self) -> None:
        """Range search on the observed samples; fills `scale` and `zero_point`."""
        if self.granularity == "dynamic_token":
            return
        stats = self._require_stats()
        if self.granularity == "group":
            missing = (stats.count == 0).nonzero().flatten().tolist()
            if missing:
                raise QuantcoreError(
                    f"position groups {missing} saw no calibration tokens; feed positions that cover every group"
                )
            parts = [
                search_range(r.values, self.n_bits, self.pcts, self.include_zero) for r in stats.reservoirs
            ]
            scale = torch.cat([p[0] for p in parts])
            zero_point = torch.cat([p[1] for p in parts])
        else:
            values = stats.reservoirs[0].values
            if values.shape[0] != self.num_params:
                raise ConfigError(
                    f"{self.granularity} quantizer was built for {self.num_params} slots but observed {values.shape[0]}"
                )
            scale, zero_point = search_range(values, self.n_bits, self.pcts, self.include_zero)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point.to(torch.int32))
        self.initialized.fill_(True)
        # The sample is no longer needed; min/max stay for SmoothQuant/GPS.
        for r in stats.reservoirs:
            r.keys = r.values = None

    def params_for(self, x: torch.Tensor, pos: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) as float tensors broadcastable against x."""
        scale, zp = self.scale, self.zero_point.float()
        if self.granularity == "tensor":
            return scale, zp
        if self.granularity == "channel":
            return scale, zp
        if self.granularity == "row":
            shape = (-1,) + (1,) * (x.dim() - 1)
            return scale.view(shape), zp.view(shape)
        if self.granularity == "group":
            if pos is None:
                raise ConfigError("a group (static token-wise) quantizer needs `pos` in forward")
            g = self.groups_of(pos)
            return scale[g][:, None], zp[g][:, None]
        lo = x.amin(dim=-1, keepdim=True)
        hi = x.amax(dim=-1, keepdim=True)
        return params_from_range(lo, hi, self.n_bits, self.include_zero)

    def quantize(self, x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        scale, zp = self.params_for(x, pos)  # a dynamic range reads x's min/max: exact in any float dtype
        return fake_quant_input(x, scale, zp, self.n_bits)


def _num_params(
    granularity: str, channels: int | None, group_of_position: torch.Tensor | None, num_groups: int | None
) -> int:
    if granularity == "tensor":
        return 1
    if granularity == "dynamic_token":
        return 0
    if granularity in ("row", "channel"):
        if channels is None or channels < 1:
            raise ConfigError(f"granularity {granularity!r} needs channels >= 1, got {channels!r}")
        return channels
    if granularity == "group":
        if group_of_position is None or group_of_position.dim() != 1 or group_of_position.numel() == 0:
            raise ConfigError("granularity 'group' needs a non-empty 1-D LongTensor group_of_position")
        used = int(group_of_position.max()) + 1
        if int(group_of_position.min()) < 0:
            raise ConfigError("group_of_position holds a negative group id")
        if num_groups is None:
            return used
        if num_groups < used:
            raise ConfigError(f"num_groups={num_groups} but group_of_position uses {used} groups")
        return num_groups
    raise ConfigError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")


def log_sqrt2_quant(x: torch.Tensor, scale: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Log-sqrt2 quantize-dequantize of non-negative x (attention probabilities)."""
    n_levels = 2**n_bits
    code = torch.round(-2 * torch.log2(x / scale))
    # Values too small for the last code (including exact zeros, whose code is +inf) decode to 0.
    underflow = code >= n_levels
    code = code.clamp(0, n_levels - 1)
    odd = torch.where(code % 2 == 1, math.sqrt(2.0), 1.0)
    out = torch.exp2(-torch.ceil(code / 2)) * odd * scale
    return out.masked_fill(underflow, 0.0)


class LogSqrt2Quantizer(_ObservingQuantizer):
    """Per-tensor log-sqrt2 quantizer for post-softmax probabilities (RepQ-ViT style, used by PAR)."""

    kind = "log_sqrt2"
    param_names = ("scale",)

    def __init__(
        self,
        n_bits: int,
        *,
        pcts: Sequence[float] = DEFAULT_PCTS,
        sample_size: int | None = None,
        seed: int = 0,
    ):
        super().__init__(n_bits, "tensor", 1, sample_size, seed)
        self.pcts = tuple(pcts)
        self.register_buffer("scale", torch.ones(1))

    def describe(self) -> dict:
        return {"kind": self.kind, "bits": self.n_bits, "granularity": "tensor", "num_groups": 1}

    def reset_stats(self) -> None:
        self._stats = _Stats(1, [Reservoir(self.sample_size, self.seed)])

    def observe(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> None:
        if self._stats is None:
            self.reset_stats()
        kept = self._kept_tokens(x, pos)
        x = x.detach()
        if kept is not None:
            x = x[..., kept.to(x.device), :]
        self._observe_rows(slice(None), x.reshape(1, -1))

    def finalize(self) -> None:
        """scale = the quantile (of the candidates) whose log-sqrt2 fake quant has the least MSE."""
        x = self._require_stats().reservoirs[0].values.flatten()
        sorted_x = x.sort().values[None]
        best_err, best_scale = math.inf, None
        for pct in self.pcts:
            scale = sorted_quantile(sorted_x, pct)
            err = float((log_sqrt2_quant(x, scale, self.n_bits) - x).square().mean())
            if err < best_err:
                best_err, best_scale = err, scale
        if best_scale is None:
            raise QuantcoreError("log-sqrt2 range search found no finite candidate (NaN inputs?)")
        self.scale.copy_(best_scale)
        self.initialized.fill_(True)
        self._stats.reservoirs[0].keys = self._stats.reservoirs[0].values = None

    def quantize(self, x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        return log_sqrt2_quant(x.float(), self.scale, self.n_bits)


def build_quantizer(desc: dict) -> UniformQuantizer | LogSqrt2Quantizer:
    """An uncalibrated quantizer with the buffer shapes of `desc`, ready for load_state_dict."""
    kind = desc.get("kind")
    if kind == LogSqrt2Quantizer.kind:
        return LogSqrt2Quantizer(desc["bits"])
    if kind != UniformQuantizer.kind:
        raise ConfigError(f"unknown quantizer kind {kind!r} in description {desc}")
    granularity = desc["granularity"]
    kwargs: dict = {"include_zero": desc.get("include_zero", False)}
    if granularity in ("row", "channel"):
        kwargs["channels"] = desc["num_groups"]
    elif granularity == "group":
        kwargs["group_of_position"] = torch.zeros(desc["num_positions"], dtype=torch.long)
        kwargs["num_groups"] = desc["num_groups"]
    return UniformQuantizer(desc["bits"], granularity, **kwargs)
