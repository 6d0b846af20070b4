"""Artifacts in formats that other tools read: `export(artifact, out, format="compressed-tensors")`."""

from __future__ import annotations

from pathlib import Path

from quantcore.errors import ConfigError

FORMATS = ("compressed-tensors",)


def export(artifact_dir: str | Path, out_dir: str | Path, format: str = "compressed-tensors") -> dict:
    """Write the artifact at `artifact_dir` in `format` to `out_dir`; returns a summary of what was written."""
    if format not in FORMATS:
        raise ConfigError(f"format {format!r} is not one of {', '.join(FORMATS)}")
    from quantcore.export.compressed_tensors import export_compressed_tensors

    return export_compressed_tensors(artifact_dir, out_dir)
