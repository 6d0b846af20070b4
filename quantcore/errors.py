"""Typed exceptions of the engine. Every message says what was wrong and how to fix it."""


class QuantcoreError(Exception):
    """Base class of every error quantcore raises on purpose."""


class ConfigError(QuantcoreError, ValueError):
    """An unknown model, a bad config value, or an argument out of range.

    `field`: where the bad value is in the caller's input when the engine knows it, e.g. ("classes",),
    ("sampling", "top_p") or ("calibration", "num_samples"); surfaces map it to their own names (the
    API's `loc`, the CLI's flag)."""

    def __init__(self, message: str, *, field: tuple[str | int, ...] | None = None):
        super().__init__(message)
        self.field = field


class CheckpointError(QuantcoreError):
    """A checkpoint file that cannot be read, is not a plain tensor dict, or does not fit the model."""


class RecipeError(QuantcoreError, ValueError):
    """A quantization recipe that does not validate."""


class ArtifactError(QuantcoreError):
    """A quantized-model artifact that is missing, tampered with or truncated."""


class ExportError(QuantcoreError):
    """An artifact that the requested export format cannot express exactly (the message names what)."""


class DatasetError(QuantcoreError):
    """A dataset file that is missing or malformed."""


class Canceled(QuantcoreError):
    """A long-running call stopped because its `should_cancel` callback said so."""
