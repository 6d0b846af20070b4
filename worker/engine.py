"""The engine as the worker sees it: a typed interface, and the module that provides it.

The default is quantcore's own (`quantcore.api`); `PTQ4ARVG_ENGINE_MODULE` names another module with
the same functions (the service tests use a scripted stand-in). The module is imported inside the
task, never at import time, so no torch code runs in a process before the worker forks.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

# progress(stage, stage_fraction, overall_fraction)
Progress = Callable[[str, float, float], None]


@runtime_checkable
class Engine(Protocol):
    def quantize_job(
        self,
        spec: dict[str, Any],
        out_dir: Path,
        progress: Progress,
        should_cancel: Callable[[], bool],
        device: str,
    ) -> dict[str, Any]:
        """Calibrate, quantize, evaluate; write the artifact into out_dir; return its manifest."""

    def describe_device(self, device: str) -> dict[str, Any]:
        """What runs the job: the resolved device, the GPU model, its memory."""


class EngineUnavailable(Exception):
    pass


def load_engine(module: str) -> Engine:
    try:
        engine = importlib.import_module(module)
    except ImportError as e:
        raise EngineUnavailable(f"the quantization engine '{module}' cannot be imported ({e})") from e
    if not isinstance(engine, Engine) or "device" not in inspect.signature(engine.quantize_job).parameters:
        raise EngineUnavailable(
            f"'{module}' does not provide the engine interface (quantize_job(spec, out_dir, progress, "
            "should_cancel, device) and describe_device(device))"
        )
    return engine
