"""An artifact in the compressed-tensors layout: the `quantization_config` that vLLM and transformers
read, and the tensors named and packed the way its compressors store them (the 0.20 layout).

    config.json          the model (family, config, tokenizer), where it came from (the artifact's
                         manifest sha256, recipe, weights sha256) and `quantization_config`
    model.safetensors    every tensor of the quantized model, quantized layers in the format's names
    tokenizer.safetensors  the artifact's tokenizer (the file it references, or its own copy), as is

What maps, and how (exactly: the same integers and scales, nothing re-rounded):
- weights, per output row asymmetric: strategy "channel", symmetric false. The format stores signed
  codes, so q in 0..2^b-1 becomes q - 2^(b-1) and the zero point z becomes z - 2^(b-1): (q - z) * s is
  unchanged. W8 with quantized activations is "int-quantized" (`weight` int8); everything else
  "pack-quantized": `weight_packed` int32, code j of a row at bits j*b.. j*b+b-1 of the row's words
  (least significant first), `weight_shape`, and the zero points packed the same way down the rows;
- static per-tensor input activations: strategy "tensor", `input_scale` and `input_zero_point`;
- attention that quantizes only K and V (`quantize_attention: "kv"`, the KV cache): `kv_cache_scheme`,
  with `k_scale`, `k_zero_point`, `v_scale`, `v_zero_point` on each attention module;
- folds (SmoothQuant, shift, GPS) are already in the weights, norms and biases: plain tensors.
Refused, with an ExportError naming the layers: STWQ's static per-position-group tables, per-input-
channel activation scales, dynamic per-token ranges (ours span each token's min..max; the format's always
reach 0, so the codes would differ), quantized attention queries and probabilities (the format has no
scheme for them), and any other quantizer it cannot express.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quantcore.artifact import (
    MANIFEST,
    MODEL_FILE,
    TOKENIZER_FILE,
    atomic_folder,
    tokenizer_source,
    verify_artifact,
)
from quantcore.errors import ExportError

FORMAT = "compressed-tensors"
CONFIG_FILE = "config.json"
QUANTIZER_PARTS = (".weight_quantizer.", ".input_quantizer.", ".a_quantizer.", ".b_quantizer.")
ATTENTION_PROBLEM = (
    "quantized attention queries and probabilities (the format has no scheme for them; a recipe with "
    'quantize_attention: "kv" quantizes only the K/V cache, false none)'
)
GRANULARITY_NAMES = {
    "group": "STWQ's static per-position-group tables (a recipe without stwq exports)",
    "channel": "per-input-channel activation scales",
    "dynamic_token": "dynamic per-token ranges (ours span each token's min..max, the format's always reach 0)",
}


def _uniform_args(bits: int, strategy: str) -> dict:
    """A QuantizationArgs of the format: static asymmetric integers."""
    return {"num_bits": bits, "type": "int", "symmetric": False, "strategy": strategy, "dynamic": False}


def _input_args(desc: dict) -> tuple[dict | None, str | None]:
    """(the scheme of an input quantizer, None) or (None, why the format cannot express it)."""
    granularity = desc.get("granularity")
    if desc.get("kind") != "uniform":
        return None, f"{desc.get('kind')} activation quantizers"
    if granularity == "tensor":
        return _uniform_args(desc["bits"], "tensor"), None
    return None, GRANULARITY_NAMES.get(granularity, f"{granularity} activation quantizers")


def _signed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes 0..2^b-1 as the format's signed int8 codes."""
    return (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (R, C) -> int32 (R, ceil(C*bits/32)): code j at bits j*bits.. of the row's words,
    least significant first, a code split across two words where it crosses one."""
    rows, cols = codes.shape
    words = -(-cols * bits // 32)
    values = codes.to(torch.int64)
    start = torch.arange(cols, dtype=torch.int64) * bits
    word, offset = (start // 32).expand(rows, cols), (start % 32).expand(rows, cols)
    packed = torch.zeros(rows, words + 1, dtype=torch.int64)
    packed.scatter_add_(1, word, (values << offset) & 0xFFFFFFFF)
    packed.scatter_add_(1, word + 1, values >> (32 - offset))  # the part past the word (0 if none)
    packed = packed[:, :words]
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # two's complement


def _weight_tensors(name: str, codes: torch.Tensor, scale, zero, bits: int, packed: bool) -> dict:
    """The format's tensors of one quantized linear from its unsigned codes, row scales and zero points."""
    zero = zero.to(torch.int64)
    tensors = {f"{name}.weight_scale": scale.float().reshape(-1, 1).contiguous()}
    if packed:
        tensors[f"{name}.weight_packed"] = pack_rows(codes, bits)
        tensors[f"{name}.weight_shape"] = torch.tensor(list(codes.shape), dtype=torch.int64)
        tensors[f"{name}.weight_zero_point"] = pack_rows(zero.reshape(1, -1), bits).reshape(-1, 1)
    else:
        tensors[f"{name}.weight"] = _signed(codes, bits)
        tensors[f"{name}.weight_zero_point"] = _signed(zero, bits).reshape(-1, 1)
    return tensors


def _static_tensors(prefix: str, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> dict:
    return {
        f"{prefix}_scale": scale.float().reshape(1),
        f"{prefix}_zero_point": _signed(zero.reshape(1), bits),
    }


def _unpacked_codes(state: dict, name: str, storage: dict) -> torch.Tensor:
    from quantcore.quant.real import unpack_codes

    packed = state.pop(f"{name}.weight_codes")
    n, k = storage["shape"]
    return packed if storage["packing"] == 8 else unpack_codes(packed, storage["packing"], k)


def _linear_names(model_name: str) -> list[str]:
    """Every linear of the model's architecture (built on the meta device: no memory, no weights)."""
    from quantcore.registry import get_spec

    model = get_spec(model_name).build("meta")
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _attention_site(name: str) -> tuple[str, str]:
    attention, _, matmul = name.rpartition(".")
    return attention, {"matmul_qk": "k", "matmul_pv": "v"}.get(matmul, matmul)


def quantization_plan(manifest: dict) -> dict:
    """What each quantized layer becomes: {"groups": {scheme key: [layer names]}, "kv": args or None,
    "schemes": {key: (weights, inputs)}}; an ExportError lists every layer the format cannot express."""
    weight_only = manifest["recipe"]["a_bits"] is None
    problems: dict[str, list[str]] = defaultdict(list)
    groups: dict[str, list[str]] = defaultdict(list)
    schemes: dict[str, tuple[dict, dict | None]] = {}
    kv_args: set[str] = set()
    for name, layer in manifest["layers"].items():
        if layer["kind"] == "matmul":
            if layer["a"] is not None:
                problems[ATTENTION_PROBLEM].append(name)
                continue
            args, why = _input_args(layer["b"])
            if why is not None:
                problems[why].append(name)
                continue
            kv_args.add(json.dumps(args))
            continue
        weight = layer["weight"]
        if weight.get("kind") != "uniform" or weight.get("granularity") != "row":
            problems[f"{weight.get('kind')} {weight.get('granularity')} weight quantizers"].append(name)
            continue
        inputs, why = (None, None) if weight_only else _input_args(layer["input"])
        if why is not None:
            problems[why].append(name)
            continue
        weights = _uniform_args(weight["bits"], "channel")
        key = json.dumps([weights, inputs])
        schemes[key] = (weights, inputs)
        groups[key].append(name)
    if len(kv_args) > 1:
        problems["K/V quantizers of different bit-widths (the format has one kv_cache_scheme)"].extend(
            n for n, layer in manifest["layers"].items() if layer["kind"] == "matmul"
        )
    if problems:
        what = "; ".join(f"{why}: {_names(layers)}" for why, layers in problems.items())
        raise ExportError(f"{FORMAT} cannot express {what}")
    kv = json.loads(kv_args.pop()) if kv_args else None
    return {"groups": dict(groups), "schemes": schemes, "kv": kv}


def _names(layers: list[str], shown: int = 4) -> str:
    more = f" and {len(layers) - shown} more" if len(layers) > shown else ""
    return ", ".join(layers[:shown]) + more


def _format_of(weights: dict, inputs: dict | None) -> str:
    return "int-quantized" if weights["num_bits"] == 8 and inputs is not None else "pack-quantized"


def quantization_config(manifest: dict, plan: dict) -> dict:
    """The `quantization_config` of config.json, in the shape of compressed-tensors' QuantizationConfig."""
    groups, formats = {}, set()
    for index, (key, layers) in enumerate(plan["groups"].items()):
        weights, inputs = plan["schemes"][key]
        scheme_format = _format_of(weights, inputs)
        formats.add(scheme_format)
        groups[f"group_{index}"] = {
            "targets": sorted(layers),
            "weights": weights,
            "input_activations": inputs,
            "output_activations": None,
            "format": scheme_format,
        }
    quantized = {n for layers in plan["groups"].values() for n in layers}
    return {
        "quant_method": FORMAT,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": [n for n in _linear_names(manifest["model"]["name"]) if n not in quantized],
        "kv_cache_scheme": plan["kv"],
    }


def compressed_state(artifact_dir: Path, manifest: dict, plan: dict) -> dict[str, torch.Tensor]:
    """The artifact's tensors with each quantized layer in the format's names and packing."""
    state = load_file(str(artifact_dir / MODEL_FILE))
    storage = manifest.get("weight_storage", {})
    out: dict[str, torch.Tensor] = {}
    for key, layers in plan["groups"].items():
        weights, inputs = plan["schemes"][key]
        packed = _format_of(weights, inputs) == "pack-quantized"
        for name in layers:
            if name not in storage:
                raise ExportError(
                    f"{artifact_dir}: {name} has no stored integer weights (format 1 artifact?)"
                )
            codes = _unpacked_codes(state, name, storage[name])
            scale, zero = (
                state[f"{name}.weight_quantizer.scale"],
                state[f"{name}.weight_quantizer.zero_point"],
            )
            out.update(_weight_tensors(name, codes, scale, zero, weights["num_bits"], packed))
            if inputs is not None:
                scale, zero = (
                    state[f"{name}.input_quantizer.scale"],
                    state[f"{name}.input_quantizer.zero_point"],
                )
                out.update(_static_tensors(f"{name}.input", scale, zero, inputs["num_bits"]))
    for name, layer in manifest["layers"].items():
        if layer["kind"] == "matmul":
            attention, operand = _attention_site(name)
            scale, zero = state[f"{name}.b_quantizer.scale"], state[f"{name}.b_quantizer.zero_point"]
            out.update(_static_tensors(f"{attention}.{operand}", scale, zero, plan["kv"]["num_bits"]))
    rest = {k: v for k, v in state.items() if not any(part in k for part in QUANTIZER_PARTS)}
    leftover = sorted(k for k in rest if k.endswith(".weight_codes"))
    if leftover:
        raise ExportError(f"{FORMAT}: stored codes of layers outside the plan: {_names(leftover)}")
    return {**rest, **out}


def export_compressed_tensors(artifact_dir: str | Path, out_dir: str | Path) -> dict:
    """Write the artifact in the compressed-tensors layout to `out_dir` (new or empty); returns a summary.

    The artifact is verified first (every sha256); the export is refused, before anything is written,
    when the artifact holds quantizers the format cannot express."""
    artifact_dir, out_dir = Path(artifact_dir), Path(out_dir)
    manifest = verify_artifact(artifact_dir)
    plan = quantization_plan(manifest)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"export folder {out_dir} is not empty; choose a new folder")
    model = manifest["model"]
    config = {
        "architectures": [f"ptq4arvg-{model['family']}"],
        "model_type": f"ptq4arvg-{model['family']}",
        "torch_dtype": next(iter(manifest.get("weight_storage", {}).values()), {}).get("dtype", "float32"),
        "ptq4arvg": {
            "model": model["name"],
            "family": model["family"],
            "config": model["config"],
            "tokenizer": model["tokenizer"],
            "weights": {k: model.get(k) for k in ("weights", "checkpoint_sha256", "tokenizer_sha256")},
            "recipe": manifest["recipe"],
            "artifact_manifest_sha256": hashlib.sha256((artifact_dir / MANIFEST).read_bytes()).hexdigest(),
        },
        "quantization_config": quantization_config(manifest, plan),
    }
    state = compressed_state(artifact_dir, manifest, plan)
    with atomic_folder(out_dir) as tmp:
        save_file(state, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        shutil.copyfile(tokenizer_source(artifact_dir, manifest), tmp / TOKENIZER_FILE)  # self-contained
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    qc = config["quantization_config"]
    return {
        "out": str(out_dir),
        "format": FORMAT,
        "compression_format": qc["format"],
        "config_groups": {g: len(s["targets"]) for g, s in qc["config_groups"].items()},
        "ignore": qc["ignore"],
        "kv_cache_scheme": qc["kv_cache_scheme"] is not None,
    }
