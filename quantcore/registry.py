"""The model registry: every named model of every family, with what it takes to build and sample it."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from quantcore import zoo
from quantcore.checkpoint import load_checkpoint
from quantcore.errors import ConfigError
from quantcore.models import FAMILY_MODULES, bind_tokenizer, family
from quantcore.models.common import ModelEntry
from quantcore.tokenizers import downsample_factor, load_tokenizer, register_tokenizer

for _name, (_config, _model_class, _) in zoo.ZOO_TOKENIZERS.items():
    register_tokenizer(_name, _config, _model_class, zoo.load_zoo_tokenizer)


class RandomWeightsWarning(UserWarning):
    """A model or tokenizer runs with random weights: its images are noise."""


@dataclass(frozen=True)
class ModelSpec:
    family: str
    entry: ModelEntry

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def config(self):
        return self.entry.config

    @property
    def bundled(self) -> bool:
        """Trained weights ship with the package (quantcore/zoo)."""
        return self.name in zoo.BUNDLED

    def build(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        with torch.device(device):
            model = family(self.family).build(self.config)
        return model.to(device)  # layout tables are built on the CPU inside the constructors

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.build("meta").parameters())

    def describe(self) -> dict:
        cfg = self.config
        return {
            "name": self.name,
            "family": self.family,
            "variant": _variant(cfg),
            "parameters": self.parameter_count(),
            "image_size": cfg.grid_size * downsample_factor(cfg.tokenizer),
            "tokens": cfg.num_tokens,
            "tokenizer": cfg.tokenizer,
            "bundled": self.bundled,
            # trained weights ship with the package, or the model runs with random ones unless given a checkpoint
            "weights": "trained" if self.bundled else "random",
            "class_names": zoo.class_names(self.name),
            "official_checkpoints": list(self.entry.official_checkpoints),
            "sampling": self.entry.sampling.to_dict(),
            "config": cfg.to_dict(),
            "notes": self.entry.notes,
            "tags": list(self.entry.tags),
        }


def _variant(cfg) -> str:
    """A config's own `variant` (VAR: next-scale), else LlamaGen's raster / par."""
    return getattr(cfg, "variant", None) or ("par" if getattr(cfg, "par_regions", 0) else "raster")


def all_specs() -> dict[str, ModelSpec]:
    specs = {
        name: ModelSpec(name_of_family, entry)
        for name_of_family in FAMILY_MODULES
        for name, entry in family(name_of_family).models.items()
    }
    specs.update({name: ModelSpec(b.family, b.entry) for name, b in zoo.BUNDLED.items()})
    return specs


def get_spec(name: str) -> ModelSpec:
    specs = all_specs()
    if name not in specs:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(sorted(specs))}")
    return specs[name]


def list_models() -> list[dict]:
    return [spec.describe() for spec in all_specs().values()]


def suggest_fit(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Name the registered configs whose parameter shapes the checkpoint has (grid size aside)."""
    fits = []
    for spec in all_specs().values():
        shapes = {k: tuple(v.shape) for k, v in spec.build("meta").state_dict().items()}
        if shapes.keys() == state_dict.keys() and all(
            tuple(state_dict[k].shape) == s for k, s in shapes.items()
        ):
            fits.append(spec.name)
    return f"Its shapes fit: {', '.join(fits)}" if fits else None


def load_model(
    name: str, checkpoint: str | Path | None = None, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """Build a registered model, with weights from `checkpoint` or (with a warning) random ones."""
    spec = get_spec(name)
    model = spec.build(device)
    if checkpoint is None and name in zoo.BUNDLED:
        checkpoint = zoo.BUNDLED[name].checkpoint
    if checkpoint is None:
        warnings.warn(
            f"{name} has no checkpoint: running with random weights, its images will be noise",
            RandomWeightsWarning,
            stacklevel=2,
        )
    else:
        keys = family(spec.family).checkpoint_keys
        load_checkpoint(model, checkpoint, suggest=suggest_fit, wrapper_keys=keys)
    return model.eval()


def tokenizer_file(name: str, tokenizer_checkpoint: str | Path | None = None) -> Path | None:
    """The file a model's tokenizer loads from: the one given, a bundled model's own, or None (random)."""
    if tokenizer_checkpoint is None and name in zoo.BUNDLED:
        return zoo.BUNDLED[name].tokenizer_checkpoint
    return None if tokenizer_checkpoint is None else Path(tokenizer_checkpoint)


def load_model_and_tokenizer(
    name: str,
    checkpoint: str | Path | None = None,
    tokenizer_checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A registered model and its tokenizer, bound together; bundled models default to their weights."""
    model = load_model(name, checkpoint, device)
    tokenizer_checkpoint = tokenizer_file(name, tokenizer_checkpoint)
    tokenizer = load_tokenizer(get_spec(name).config.tokenizer, tokenizer_checkpoint, device)
    bind_tokenizer(model, tokenizer)
    return model, tokenizer
