"""Recipes: a validated, serialisable list of passes plus bit-widths (configuration is data).

    Recipe.preset("ptq4arvg", w_bits=6, a_bits=6)
    Recipe.model_validate_json(text)  /  recipe.model_dump_json()  /  Recipe.from_yaml(text)

The `ptq4arvg` preset runs the official order: SmoothQuant (alpha 0.5) -> symmetric shift -> GPS ->
static token-wise activation tables.
"""

from __future__ import annotations

from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from quantcore.errors import RecipeError


class _Pass(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SmoothQuant(_Pass):
    kind: Literal["smoothquant"] = "smoothquant"
    alpha: float = Field(0.5, ge=0.0, le=1.0)


class Shift(_Pass):
    """Per-channel centring (OS+-style), from the per-channel quantizer's zero-points (reference §5.3)."""

    kind: Literal["shift"] = "shift"


class GPS(_Pass):
    kind: Literal["gps"] = "gps"
    shared: Literal["first", "concat"] = "first"  # linears sharing an input: official uses the first


class STWQ(_Pass):
    kind: Literal["stwq"] = "stwq"
    mode: Literal["groups", "per_position"] = "groups"


class DynamicToken(_Pass):
    """Dynamic per-token activation ranges (the DTWQ ablation): nothing static, min/max at run time."""

    kind: Literal["dynamic_token"] = "dynamic_token"


Pass = Annotated[SmoothQuant | Shift | GPS | STWQ | DynamicToken, Field(discriminator="kind")]
SMOOTHING = ("smoothquant", "shift", "gps")
GRANULARITY = ("stwq", "dynamic_token")
PRESETS: dict[str, list[dict]] = {
    "rtn": [],
    "smoothquant": [{"kind": "smoothquant"}],
    "os+": [{"kind": "shift"}, {"kind": "smoothquant"}],
    "gps": [{"kind": "gps"}],
    "stwq": [{"kind": "stwq"}],
    "sq+stwq": [{"kind": "smoothquant"}, {"kind": "stwq"}],
    "ptq4arvg": [{"kind": "smoothquant"}, {"kind": "shift"}, {"kind": "gps"}, {"kind": "stwq"}],
    "dtwq": [{"kind": "smoothquant"}, {"kind": "shift"}, {"kind": "gps"}, {"kind": "dynamic_token"}],
}


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    w_bits: int = Field(8, ge=2, le=8, description="weight bits (per output channel, asymmetric)")
    a_bits: int | None = Field(8, ge=2, le=8, description="activation bits; null = weight-only")
    passes: list[Pass] = Field(default_factory=list)
    quantize_attention: bool = Field(True, description="quantize both attention matmuls (Q·K^T, P·V)")
    percentiles: tuple[float, ...] = Field((0.999, 0.9999, 0.99999), min_length=1)

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        kinds = [p.kind for p in self.passes]
        for i, kind in enumerate(kinds):
            if kinds.index(kind) != i:
                raise ValueError(f"passes[{i}]: {kind!r} appears twice")
            if self.a_bits is None and kind != "smoothquant":
                raise ValueError(
                    f"passes[{i}]: {kind!r} needs activation quantization; set a_bits or drop it"
                )
            if kind in SMOOTHING and any(k in GRANULARITY for k in kinds[:i]):
                raise ValueError(f"passes[{i}]: {kind!r} must come before stwq/dynamic_token")
        if "stwq" in kinds and "dynamic_token" in kinds:
            raise ValueError("passes: stwq and dynamic_token are alternatives; keep one")
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

    @classmethod
    def preset(cls, name: str, w_bits: int = 8, a_bits: int | None = 8) -> Recipe:
        if name not in PRESETS:
            raise RecipeError(f"recipe: unknown preset {name!r}; presets are {', '.join(PRESETS)}")
        passes = PRESETS[name] if a_bits is not None else []
        return cls.parse({"name": name, "w_bits": w_bits, "a_bits": a_bits, "passes": passes})

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
