"""The pass registry: each quantization pass is one file that declares its configuration (a `PassConfig`)
and registers the handler that runs it (`@register_pass(Config)`), as torchao registers a handler per
config and llm-compressor keeps a modifier in one class.

The recipe's list of passes is the union of the registered configurations, and the pipeline dispatches
each configured pass to its handler, which receives only its own configuration (plus the pipeline's
`PassContext`). Two roles:
- "transform" passes rewrite weights and fold into the producers of their inputs (`run`);
- "granularity" passes choose the final activation quantizer of each linear (`act_quantizer`).

pydantic only: recipes (and so the API process) import this without torch.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from quantcore.errors import ConfigError

Role = Literal["transform", "granularity"]


class PassConfig(BaseModel):
    """A pass's configuration: `kind` names it in recipe files; the class variables describe it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    role: ClassVar[Role] = "transform"
    weight_only: ClassVar[bool] = False  # also runs when activations stay in float (a_bits null)


class PassHandler:
    """Runs one configured pass. `ctx` is `quantcore.pipeline.PassContext`: the model, its layout, sweeps
    over the calibration set, quantizer construction and folding."""

    def __init__(self, config: PassConfig):
        self.config = config

    def run(self, ctx) -> dict:
        """A transform pass: rewrite the model; returns a JSON-able summary per layer for the report."""
        raise NotImplementedError(f"{self.config.kind} is a {self.config.role} pass; it has no run()")

    def act_quantizer(self, ctx, linear: str):
        """A granularity pass: the final input quantizer of `linear`, or None for the per-tensor default."""
        raise NotImplementedError(
            f"{self.config.kind} is a {self.config.role} pass; it has no act_quantizer()"
        )


_REGISTRY: dict[str, tuple[type[PassConfig], type[PassHandler]]] = {}


def register_pass(config: type[PassConfig]):
    """Class decorator: `handler` runs passes configured by `config`."""
    kind = config.model_fields["kind"].default
    if not isinstance(kind, str) or not kind:
        raise ConfigError(f"{config.__name__}.kind needs a string default (the name recipe files use)")

    def decorate(handler: type[PassHandler]) -> type[PassHandler]:
        if kind in _REGISTRY:
            raise ConfigError(f"a pass named {kind!r} is registered twice")
        _REGISTRY[kind] = (config, handler)
        return handler

    return decorate


def pass_kinds() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def config_class(kind: str) -> type[PassConfig]:
    if kind not in _REGISTRY:
        raise ConfigError(f"unknown pass {kind!r}; passes are {', '.join(_REGISTRY)}")
    return _REGISTRY[kind][0]


def config_union():
    """The pydantic type of one recipe entry: any registered configuration, told apart by `kind`."""
    configs = tuple(config for config, _ in _REGISTRY.values())
    return Annotated[Union[configs], Field(discriminator="kind")]  # noqa: UP007 - a runtime tuple


def handler_for(config: PassConfig) -> PassHandler:
    return _REGISTRY[config.kind][1](config)
