"""Reading checkpoint files safely and loading them into models with a strict, explained check.

Nothing from a file is ever executed: `.safetensors` files are read by safetensors, everything else by
`torch.load(weights_only=True)`, which refuses any pickle that is more than tensors and containers. The
one class let through is `argparse.Namespace`: the official training scripts save their arguments beside
the weights (`{"model", "optimizer", "steps", "args"}`); only the model's tensors are kept.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from quantcore.errors import CheckpointError

# Official training scripts wrap the weights under one of these keys (LlamaGen/PAR: model; DDP: module).
WRAPPER_KEYS = ("model", "module", "state_dict", "model_ema", "ema")
SHOWN = 5  # how many offending keys an error message lists
# Globals a torch file may name besides tensors and containers: the training scripts' `args`. A
# Namespace unpickles into attributes only (no constructor or method of the file's choosing runs).
SAFE_GLOBALS = (argparse.Namespace,)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(
    path: str | Path, wrapper_keys: tuple[str, ...] = WRAPPER_KEYS, *, lazy: bool = False
) -> dict[str, torch.Tensor]:
    """Return the flat tensor dict stored in `path` (.safetensors, or a .pt/.pth/.bin torch file).

    `lazy` reads no tensor data (to check a file's keys and shapes cheaply): safetensors entries come
    back as meta tensors of their shape, a torch (zip) file is memory-mapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            if not lazy:
                return load_file(str(path))
            with safe_open(str(path), "pt") as f:
                return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path} is not a valid safetensors file: {exc}") from exc
    try:
        # memory-mapped where the format allows (zip files): an optimizer state beside the weights is
        # then never read from disk; `lazy` reads no tensor data at all
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} is not a plain tensor dict (refused by the weights-only loader, nothing "
            f"in it was executed): {first_line}. Re-save it as a state dict or as safetensors."
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read as a torch file: {exc}") from exc
    return _unwrap(obj, path, wrapper_keys)


def _unwrap(obj: object, path: Path, wrapper_keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in wrapper_keys:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"checkpoint {path} holds no state dict (expected a dict of tensors, optionally under one of "
            f"{', '.join(wrapper_keys)})"
        )
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"checkpoint {path} has entries that are not tensors: {not_tensors[:SHOWN]}; "
            "expected a flat dict of parameter name -> tensor"
        )
    return {str(k): v for k, v in obj.items()}


def check_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    suggest: Callable[[Mapping[str, torch.Tensor]], str | None] | None = None,
) -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped keys, if any."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mis_shaped = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {expected[k]}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != expected[k]
    ]
    if not (missing or unexpected or mis_shaped):
        return
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
        if items:
            more = f" (+{len(items) - SHOWN} more)" if len(items) > SHOWN else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:SHOWN])}{more}")
    message = f"checkpoint {source} does not fit the model: " + "; ".join(parts)
    hint = suggest(state_dict) if suggest else None
    if hint:
        message += f". {hint}"
    raise CheckpointError(message)


def load_checkpoint(
    model: nn.Module,
    path: str | Path,
    suggest: Callable[[Mapping[str, torch.Tensor]], str | None] | None = None,
    wrapper_keys: tuple[str, ...] = WRAPPER_KEYS,
) -> nn.Module:
    """Strictly load the weights in `path` into `model` (in place) and return the model; `wrapper_keys`
    are tried in order where the file wraps its weights (MAR prefers its `model_ema`)."""
    state_dict = read_state_dict(path, wrapper_keys)
    check_state_dict(model, state_dict, str(path), suggest)
    model.load_state_dict(state_dict, strict=True)
    return model
