"""Quantized-model artifacts: a folder of safetensors files and a manifest that pins them.

    model.safetensors       the quantized model's state: quantized linears keep their integer weight
                            codes (4- and 6-bit packed, else one byte each) beside their per-row
                            scale and zero-point; everything else (biases, norms, embeddings,
                            quantizer tables) as is
    tokenizer.safetensors   only for a tokenizer with random weights (nothing else could reproduce it);
                            a tokenizer loaded from a file is referenced instead: the manifest's
                            `tokenizer_weights` names the file (bundled: by name in the zoo; else its
                            path) with its sha256 and size, and loading checks that hash
    manifest.json           model id + checkpoint hash, recipe, per-layer quantization, calibration
                            selection, metrics, library versions, and sha256 + size of every file

Writes are atomic (a temporary sibling folder renamed into place); loading verifies every hash
before a byte is deserialised, and nothing is unpickled. Loading turns the codes back into the weight
(q - z) * s in its recorded dtype (which re-quantizes to the same codes: |q - z| <= 255 and bf16's
relative rounding 2^-9 keep it within half a step), so a loaded model computes what the saved one did,
and keeps the codes themselves on each layer (`QuantLinear.keep_stored_codes`): while a weight is the
loaded one, its real module is built from what was stored, not re-quantized from the float weight.
Format 1 artifacts (float weights) still load.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quantcore import __version__
from quantcore.checkpoint import file_sha256
from quantcore.errors import ArtifactError

FORMAT = "ptq4arvg-artifact/3"  # 3: the tokenizer is referenced, not copied
READABLE_FORMATS = ("ptq4arvg-artifact/1", "ptq4arvg-artifact/2", FORMAT)
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.safetensors"


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def _packed_model_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The model's tensors with every quantized linear weight replaced by its integer codes, and the
    manifest entry that says how each was stored."""
    from quantcore.quant.modules import QuantLinear, iter_quant_modules
    from quantcore.quant.quantizer import UniformQuantizer
    from quantcore.quant.real import pack_codes, weight_codes

    state = _tensors(model)
    storage: dict[str, dict] = {}
    for name, module in iter_quant_modules(model):
        wq = getattr(module, "weight_quantizer", None)
        if not isinstance(module, QuantLinear) or not isinstance(wq, UniformQuantizer):
            continue
        if wq.mode != "on" or not bool(wq.initialized) or wq.n_bits > 8:
            continue
        codes = weight_codes(module).to(torch.uint8).cpu()
        n, k = codes.shape
        packing = wq.n_bits if (wq.n_bits == 4 and k % 2 == 0) or (wq.n_bits == 6 and k % 4 == 0) else 8
        weight = state.pop(f"{name}.weight")
        state[f"{name}.weight_codes"] = pack_codes(codes, packing) if packing < 8 else codes
        storage[name] = {"bits": wq.n_bits, "packing": packing, "shape": [n, k], "dtype": str(weight.dtype)}
    return state, storage


def _unpack_weights(state: dict[str, torch.Tensor], storage: dict[str, dict]) -> dict[str, torch.Tensor]:
    """In place: `<layer>.weight_codes` -> `<layer>.weight` = (q - z) * s in the recorded dtype; returns
    each layer's codes, unpacked (uint8, (N, K))."""
    from quantcore.quant.quantizer import dequantize_codes
    from quantcore.quant.real import unpack_codes

    stored = {}
    for name, meta in storage.items():
        packed = state.pop(f"{name}.weight_codes")
        n, k = meta["shape"]
        codes = packed if meta["packing"] == 8 else unpack_codes(packed, meta["packing"], k)
        scale = state[f"{name}.weight_quantizer.scale"].float()
        zero = state[f"{name}.weight_quantizer.zero_point"].float()
        weight = dequantize_codes(codes, scale[:, None], zero[:, None])
        state[f"{name}.weight"] = weight.to(getattr(torch, meta["dtype"].removeprefix("torch."))).reshape(
            n, k
        )
        stored[name] = codes.reshape(n, k)
    return stored


def versions() -> dict:
    return {"ptq4arvg": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _tokenizer_reference(path: Path) -> dict:
    from quantcore.zoo import WEIGHTS_DIR

    path = Path(path).resolve()
    bundled = path.parent == WEIGHTS_DIR.resolve()  # named, not located: the install may move
    return {
        "source": "bundled" if bundled else "file",
        "path": path.name if bundled else str(path),
        "sha256": file_sha256(path),
        "size": path.stat().st_size,
    }


def tokenizer_weights_path(reference: dict) -> Path:
    """Where a manifest's `tokenizer_weights` reference points on this machine."""
    from quantcore.zoo import WEIGHTS_DIR

    if reference.get("source") == "bundled":
        name = str(reference.get("path", ""))
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise ArtifactError(f"unsafe bundled tokenizer name {name!r} in the manifest")
        return WEIGHTS_DIR / name
    return Path(reference["path"])


def tokenizer_source(artifact_dir: Path, manifest: dict) -> Path:
    """The tokenizer weights of an artifact: the file its manifest references, else its own copy."""
    if "tokenizer_weights" in manifest:
        return tokenizer_weights_path(manifest["tokenizer_weights"])
    return Path(artifact_dir) / TOKENIZER_FILE


def _verify_tokenizer_reference(artifact_dir: Path, reference: dict) -> None:
    path = tokenizer_weights_path(reference)
    if not path.is_file():
        raise ArtifactError(f"{artifact_dir}: its tokenizer weights {path} are missing on this machine")
    if path.stat().st_size != reference["size"] or file_sha256(path) != reference["sha256"]:
        raise ArtifactError(
            f"{artifact_dir}: tokenizer weights {path} are not the file the artifact was made with "
            f"(sha256 {reference['sha256'][:12]}…)"
        )


@contextlib.contextmanager
def atomic_folder(out_dir: Path) -> Iterator[Path]:
    """A temporary sibling folder to write into; it becomes `out_dir` (absent or empty) when the block
    ends, and is removed when the block raises, so a reader never sees half a folder."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_artifact(
    out_dir: str | Path,
    model: torch.nn.Module,
    tokenizer: torch.nn.Module,
    manifest: dict,
    tokenizer_checkpoint: str | Path | None = None,
) -> dict:
    """Write the artifact to `out_dir` (which must not exist or be empty); returns the full manifest.
    `tokenizer_checkpoint`: the file the tokenizer was loaded from (referenced, not copied); None = its
    weights are random and are stored."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ArtifactError(f"artifact folder {out_dir} is not empty; choose a new folder")
    with atomic_folder(out_dir) as tmp:
        state, storage = _packed_model_state(model)
        save_file(state, str(tmp / MODEL_FILE))
        names = [MODEL_FILE]
        reference = {}
        if tokenizer_checkpoint is None:
            save_file(_tensors(tokenizer), str(tmp / TOKENIZER_FILE))
            names.append(TOKENIZER_FILE)
        else:
            reference = {"tokenizer_weights": _tokenizer_reference(Path(tokenizer_checkpoint))}
        files = {
            name: {"sha256": file_sha256(tmp / name), "size": (tmp / name).stat().st_size} for name in names
        }
        full = {
            "format": FORMAT,
            **manifest,
            **reference,
            "weight_storage": storage,
            "versions": versions(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=False))
        for path in tmp.iterdir():  # readable by the API process, whichever user it runs as
            path.chmod(0o644)
        tmp.chmod(0o755)
    return full


def read_manifest(artifact_dir: str | Path) -> dict:
    path = Path(artifact_dir) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{artifact_dir} is not an artifact: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    if manifest.get("format") not in READABLE_FORMATS:
        raise ArtifactError(
            f"{path}: unsupported artifact format {manifest.get('format')!r}; this version reads "
            f"{', '.join(READABLE_FORMATS)}"
        )
    return manifest


def verify_artifact(artifact_dir: str | Path) -> dict:
    """Check every listed file's size and sha256; return the manifest or raise ArtifactError."""
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    files = manifest.get("files") or {}
    reference = manifest.get("tokenizer_weights")
    for name in (MODEL_FILE,) if reference else (MODEL_FILE, TOKENIZER_FILE):
        if name not in files:
            raise ArtifactError(f"{artifact_dir}: manifest does not list {name}")
    if reference:
        _verify_tokenizer_reference(artifact_dir, reference)
    for name, meta in files.items():
        if "/" in name or "\\" in name or name.startswith("."):
            raise ArtifactError(f"{artifact_dir}: manifest lists an unsafe file name {name!r}")
        path = artifact_dir / name
        if not path.is_file():
            raise ArtifactError(f"{artifact_dir}: {name} is missing")
        size = path.stat().st_size
        if size != meta["size"]:
            raise ArtifactError(
                f"{artifact_dir}: {name} is {size} bytes, the manifest says {meta['size']} (truncated?)"
            )
        if file_sha256(path) != meta["sha256"]:
            raise ArtifactError(
                f"{artifact_dir}: {name} does not match its sha256 in the manifest (modified?)"
            )
    return manifest


def load_artifact(artifact_dir: str | Path, device: str | torch.device = "cpu"):
    """(quantized model, tokenizer, manifest), after verifying every file."""
    from quantcore.models import bind_tokenizer
    from quantcore.pipeline import rebuild_structure
    from quantcore.quant.modules import set_quant_mode
    from quantcore.registry import get_spec
    from quantcore.tokenizers import build_tokenizer, load_tokenizer

    artifact_dir = Path(artifact_dir)
    manifest = verify_artifact(artifact_dir)
    spec = get_spec(manifest["model"]["name"])
    state = load_file(str(artifact_dir / MODEL_FILE))
    try:
        stored = _unpack_weights(state, manifest.get("weight_storage", {}))
    except (KeyError, RuntimeError, ValueError) as exc:
        raise ArtifactError(f"{artifact_dir}: packed weights do not match the manifest: {exc}") from None
    model = rebuild_structure(spec.build("cpu"), manifest["layers"], state)
    try:
        model.load_state_dict(state, strict=True)
        if "tokenizer_weights" in manifest:
            path = tokenizer_weights_path(manifest["tokenizer_weights"])
            tokenizer = load_tokenizer(manifest["model"]["tokenizer"], path)
        else:
            tokenizer = build_tokenizer(manifest["model"]["tokenizer"])
            tokenizer.load_state_dict(load_file(str(artifact_dir / TOKENIZER_FILE)), strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{artifact_dir}: weights do not fit the recorded structure: {exc}") from None
    bind_tokenizer(model, tokenizer)
    weight_only = manifest["recipe"]["a_bits"] is None
    set_quant_mode(model, weights="on", acts="off" if weight_only else "on")
    model = model.to(device).eval()
    for name, codes in stored.items():  # kept for the weights as they now are, on `device`
        model.get_submodule(name).keep_stored_codes(codes)
    return model, tokenizer.to(device).eval(), manifest
