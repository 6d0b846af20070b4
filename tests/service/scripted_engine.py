"""A stand-in engine that follows the quantcore engine contract exactly, with scripted behaviour.

The service tests point the worker at it (PTQ4ARVG_ENGINE_MODULE=scripted_engine) to exercise the
job machinery (claim, progress, cancel, failures, crash recovery, artifacts) while quantcore.api is
being written; the end-to-end tests in test_engine_e2e.py use the real engine. Behaviour per model:

- scripted-fast:  5 quick steps, then an artifact (a weights file + manifest.json);
- scripted-slow:  calibration.num_samples steps of 0.1 s each, checking should_cancel between steps;
- scripted-usererror: raises quantcore.errors.ConfigError (a user error);
- scripted-crash: raises RuntimeError (an internal failure);
- scripted-random: like scripted-fast, but not bundled (no weights: generation refuses it);
- scripted-big, scripted-huge: like scripted-fast, with 4 and 8 MB of weights when loaded to generate.

Every completed run appends one line to $SCRIPTED_ENGINE_LOG, so tests can count completions.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from quantcore.errors import Canceled, ConfigError

SAMPLING = {"cfg_scale": 1.5, "temperature": 1.0, "delay_s": 0.0}  # delay_s: a slow device, for queueing
MODELS = [
    {
        "name": name,
        "family": "scripted",
        "bundled": bundled,
        "parameters": parameters,
        "official_checkpoints": [],
        "sampling": SAMPLING,
        "config": {"num_classes": 10},
    }
    for name, bundled, parameters in (
        ("scripted-fast", True, 1000),
        ("scripted-slow", True, 1000),
        ("scripted-usererror", True, 1000),
        ("scripted-crash", True, 1000),
        ("scripted-random", False, 1000),  # no weights anywhere: generation refuses it by default
        ("scripted-big", True, 1_000_000),  # 4 MB of float32 weights once loaded
        ("scripted-huge", True, 2_000_000),  # 8 MB
    )
]
PARAMETERS = {m["name"]: m["parameters"] for m in MODELS}


def list_models() -> list[dict]:
    return [dict(m) for m in MODELS]


def describe_device(device: str = "auto") -> dict:
    return {"device": "cpu" if device == "auto" else device, "name": "scripted"}


def quantize_job(spec: dict, out_dir: Path, progress, should_cancel, device: str = "auto") -> dict:
    model = spec["model"]
    if model == "scripted-usererror":
        raise ConfigError(f"w_bits={spec['w_bits']} is not supported by {model}: use w_bits=8")
    if model == "scripted-crash":
        raise RuntimeError("scripted crash in the middle of calibration")
    steps, delay = (5, 0.02) if model != "scripted-slow" else (int(spec["calibration"]["num_samples"]), 0.1)
    for i in range(steps):
        if should_cancel():
            raise Canceled("canceled between calibration batches")
        progress("calibration", i / steps, i / steps)
        time.sleep(delay)
    progress("calibration", 1.0, 1.0)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=False, exist_ok=True)
    weights = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).digest() * 64
    (out_dir / "model.safetensors").write_bytes(weights)
    manifest = {
        "model": model,
        "checkpoint": spec.get("checkpoint"),
        "recipe": spec["recipe"],
        "w_bits": spec["w_bits"],
        "a_bits": spec["a_bits"],
        "calibration": spec["calibration"],
        "metrics": {"proxy_fid": 1.23, "token_agreement": 0.98},
        # the execution record quantcore writes for a planned job (objective "memory" on the CPU)
        "execution": {
            "name": "cpu",
            "objective": "memory",
            "layers": {"blocks.0.fc": {"path": "int8-cpu"}, "head": {"path": "simulated"}},
            "vs_simulated": {"logit_kl": 0.0004, "top1_agreement": 0.99, "sequences": 16},
        },
        "files": {"model.safetensors": {"sha256": hashlib.sha256(weights).hexdigest(), "size": len(weights)}},
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    log = os.environ.get("SCRIPTED_ENGINE_LOG")
    if log:
        with open(log, "a") as f:
            f.write(
                json.dumps({"model": model, "seed": spec["calibration"]["seed"], "pid": os.getpid()}) + "\n"
            )
    return manifest


class _Generator:
    default_sampling = dict(SAMPLING)

    def __init__(self, source: str, parameters: int):
        import torch

        self.source = source
        self.model = torch.nn.Module()  # weights of the declared size: the service measures them
        self.model.weight = torch.nn.Parameter(torch.zeros(parameters))

    def generate(self, classes: list[int], seeds: list[int], **sampling):
        import torch

        time.sleep(float(sampling.get("delay_s", 0)))
        images = []
        for c, s in zip(classes, seeds, strict=True):
            g = torch.Generator().manual_seed(int(s) * 1000 + int(c))
            images.append(torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8))
        return torch.stack(images)


def load_generator(source: str, checkpoint: str | None = None, device: str = "auto"):
    if source in PARAMETERS:
        return _Generator(source, PARAMETERS[source])
    manifest = Path(source) / "manifest.json"
    if not manifest.is_file():
        raise ConfigError(f"unknown model or artifact '{source}'")
    return _Generator(source, PARAMETERS[json.loads(manifest.read_text())["model"]])
