"""Recipes: a validated, serialisable list of passes plus bit-widths and the calibration procedure.

    Recipe.preset("ptq4arvg", w_bits=6, a_bits=6)
    Recipe.model_validate_json(text)  /  recipe.model_dump_json()  /  Recipe.from_yaml(text)

A recipe entry is any registered pass configuration (`quantcore.methods.registry`), told apart by its
`kind`. The `ptq4arvg` preset runs the official order: SmoothQuant (alpha 0.5) -> symmetric shift ->
GPS -> static token-wise activation tables. `calibration` says how every range is observed:
- "official" does what the official code does: quantizers set themselves inside quantized forwards, so
  each layer is calibrated on the quantized outputs of the layers before it, with the family's batches
  and running averages (VAR/PAR), RAR's zero-including ranges, and so on (`QuantLayout.official`);
- "staged" observes every range on the float model with whole-set statistics, then quantizes.
Each option left unset follows the mode; setting one overrides it (for ablations).
pydantic and yaml only: no torch.
"""

from __future__ import annotations

from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from quantcore.errors import RecipeError
from quantcore.methods import registry
from quantcore.methods.dynamic_token import DynamicToken
from quantcore.methods.gps import GPS
from quantcore.methods.shift import Shift
from quantcore.methods.smoothquant import SmoothQuant
from quantcore.methods.stwq import STWQ

__all__ = ["GPS", "STWQ", "Calibration", "DynamicToken", "Recipe", "Shift", "SmoothQuant", "parse_bits"]

Pass = registry.config_union()
CALIBRATION_MODES = ("official", "staged")
DEFAULT_CALIBRATION = "official"
_PTQ4ARVG = [{"kind": "smoothquant"}, {"kind": "shift"}, {"kind": "gps"}, {"kind": "stwq"}]
# name -> recipe fields besides the bits (passes, and a calibration where it is not the default)
PRESETS: dict[str, dict] = {
    "rtn": {"passes": []},
    "smoothquant": {"passes": [{"kind": "smoothquant"}]},
    "os+": {"passes": [{"kind": "shift"}, {"kind": "smoothquant"}]},
    "gps": {"passes": [{"kind": "gps"}]},
    "stwq": {"passes": [{"kind": "stwq"}]},
    "sq+stwq": {"passes": [{"kind": "smoothquant"}, {"kind": "stwq"}]},
    "ptq4arvg": {"passes": _PTQ4ARVG},
    "ptq4arvg-staged": {"passes": _PTQ4ARVG, "calibration": {"mode": "staged"}},
    "dtwq": {
        "passes": [{"kind": "smoothquant"}, {"kind": "shift"}, {"kind": "gps"}, {"kind": "dynamic_token"}]
    },
}


class Calibration(BaseModel):
    """How the passes and the final step observe activation ranges; None follows `mode`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["official", "staged"] = DEFAULT_CALIBRATION
    include_zero: bool | None = Field(
        None, description="every per-tensor/channel/row range contains 0 (official RAR)"
    )
    sink_aware_heads: bool | None = Field(
        None, description="the LM head leaves sink tokens out of its statistics (staged; official: no)"
    )
    causal_mask: bool | None = Field(
        None, description="calibration forwards use the causal mask (official VAR runs unmasked)"
    )
    ema: bool | None = Field(
        None, description="official mode: batches of the family's size averaged by an EMA (VAR/PAR)"
    )
    recalibrate_all: bool | None = Field(
        None, description="official mode: the last forward resets every activation quantizer (not RAR)"
    )
    head_second_shift: bool | None = Field(
        None, description="GPS centres a head that has no GPS once more (official RAR)"
    )

    @model_validator(mode="after")
    def _check(self) -> Calibration:
        for name in ("ema", "recalibrate_all"):
            if getattr(self, name) is not None and self.mode != "official":
                raise ValueError(
                    f"{name} describes the official mode's sequential calibration; set mode official"
                )
        return self


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    w_bits: int = Field(8, ge=2, le=8, description="weight bits (per output channel, asymmetric)")
    a_bits: int | None = Field(8, ge=2, le=8, description="activation bits; null = weight-only")
    passes: list[Pass] = Field(default_factory=list)
    quantize_attention: bool | Literal["kv"] = Field(
        True,
        description='quantize both attention matmuls (Q·K^T, P·V); "kv": only K and V, the KV cache '
        "(queries and probabilities stay in the model's dtype)",
    )
    percentiles: tuple[float, ...] = Field((0.999, 0.9999, 0.99999), min_length=1)
    calibration: Calibration = Field(default_factory=Calibration)

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        kinds = [p.kind for p in self.passes]
        for i, p in enumerate(self.passes):
            if kinds.index(p.kind) != i:
                raise ValueError(f"passes[{i}]: {p.kind!r} appears twice")
            if self.a_bits is None and not p.weight_only:
                raise ValueError(
                    f"passes[{i}]: {p.kind!r} needs activation quantization; set a_bits or drop it"
                )
            if p.role == "transform" and any(q.role == "granularity" for q in self.passes[:i]):
                granularity = ", ".join(q.kind for q in self.passes[:i] if q.role == "granularity")
                raise ValueError(f"passes[{i}]: {p.kind!r} must come before {granularity}")
        granularity = [p.kind for p in self.passes if p.role == "granularity"]
        if len(granularity) > 1:
            raise ValueError(f"passes: {' and '.join(granularity)} are alternatives; keep one")
        for i, p in enumerate(self.percentiles):
            if not 0.5 < p < 1.0:
                raise ValueError(f"percentiles[{i}]: {p} must be in (0.5, 1)")
        return self

    @property
    def weight_only(self) -> bool:
        return self.a_bits is None

    @property
    def bits_label(self) -> str:
        return f"w{self.w_bits}" + (f"a{self.a_bits}" if self.a_bits else "")

    def has(self, kind: str):
        return next((p for p in self.passes if p.kind == kind), None)

    @property
    def granularity(self):
        """The pass that chooses the final activation quantizers, or None (per-tensor)."""
        return next((p for p in self.passes if p.role == "granularity"), None)

    @classmethod
    def preset(cls, name: str, w_bits: int = 8, a_bits: int | None = 8) -> Recipe:
        if name not in PRESETS:
            raise RecipeError(f"recipe: unknown preset {name!r}; presets are {', '.join(PRESETS)}")
        fields = dict(PRESETS[name])
        if a_bits is None:
            fields["passes"] = []
        return cls.parse({"name": name, "w_bits": w_bits, "a_bits": a_bits, **fields})

    @classmethod
    def parse(cls, data: dict | str) -> Recipe:
        """Validate a dict or JSON/YAML text; errors become RecipeError naming the field."""
        try:
            if isinstance(data, str):
                data = yaml.safe_load(data)
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(["recipe", *(str(p) for p in first["loc"])])
            raise RecipeError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None
        except yaml.YAMLError as exc:
            raise RecipeError(f"recipe: not valid JSON/YAML: {exc}") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_bits(label: str) -> tuple[int, int | None]:
    """'w8a8' -> (8, 8); 'w4' -> (4, None)."""
    text = label.strip().lower()
    try:
        if "a" in text:
            w, a = text.removeprefix("w").split("a")
            return int(w), int(a)
        return int(text.removeprefix("w")), None
    except ValueError:
        raise RecipeError(f"bits: {label!r} is not like w8a8, w6a6, w4a8 or w8") from None
