"""Where the engine runs: `resolve_device("auto" | "cpu" | "cuda" | "cuda:N")` and what that device is.

"auto" is the first visible CUDA device, else the CPU: a job or generator on a GPU machine runs on the
GPU with nothing configured. A GPU worker is pinned to its card with CUDA_VISIBLE_DEVICES, so inside
it "cuda" and "auto" both mean that card.
"""

from __future__ import annotations

import re

import torch

from quantcore.errors import ConfigError
from quantcore.spec import DEVICE_PATTERN


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The torch device a setting names; a ConfigError that says what is there when it cannot be used."""
    if isinstance(name, torch.device):
        name = str(name)
    text = str(name).strip().lower()
    if not re.match(DEVICE_PATTERN, text):
        raise ConfigError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N")
    if text == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {text!r}: no CUDA device is visible here; use auto or cpu")
    index = int(text.split(":")[1]) if ":" in text else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"device {text!r}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def describe_device(device: torch.device) -> dict:
    """What the job record and the manifest say about the device that ran them."""
    info = {"device": str(device), "name": "cpu", "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
        )
    return info
