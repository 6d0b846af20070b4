"""`ptq4arvg export --format compressed-tensors`, checked by the compressed-tensors package itself: its
pydantic models validate the `quantization_config`, and its own compressors decompress our tensors into
exactly the weights the artifact computes with; its fake-quantize reproduces our activation and K/V
quantizers from the exported scales and zero points."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from quantcore.api import quantize_job
from quantcore.artifact import load_artifact
from quantcore.errors import ExportError
from quantcore.export import export
from quantcore.export.compressed_tensors import pack_rows
from quantcore.quant.modules import QuantLinear, QuantMatMul, iter_quant_modules

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.base import BaseCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32  # noqa: E402
from compressed_tensors.config import CompressionFormat  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import fake_quantize  # noqa: E402

SMALL = {"calibration": {"num_samples": 2, "batch_size": 2}, "evaluation": {"num_images": 0}}


def _artifact(tmp_path, name: str, recipe: dict, model: str = "llamagen-tiny"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: fine for the format
        quantize_job({"model": model, "recipe": recipe, **SMALL}, tmp_path / name)
    return tmp_path / name


def _exported(tmp_path, artifact):
    summary = export(artifact, tmp_path / f"{artifact.name}-ct")
    out = tmp_path / f"{artifact.name}-ct"
    config = json.loads((out / "config.json").read_text())
    return summary, config, load_file(str(out / "model.safetensors"))


def _local(tensors: dict, name: str) -> dict:
    """One module's tensors under their local names, as a compressor takes them."""
    prefix = name + "."
    return {
        k.removeprefix(prefix): v
        for k, v in tensors.items()
        if k.startswith(prefix) and "." not in k[len(prefix) :]
    }


@pytest.mark.parametrize(
    ("model_name", "recipe", "compression"),
    [
        # W8A8 with the K/V cache quantized: int-quantized weights, static inputs, a kv_cache_scheme;
        # VAR's word embedding is a linear the recipes leave in FP: the ignore list
        (
            "tiny-var",
            {"w_bits": 8, "a_bits": 8, "passes": [{"kind": "smoothquant"}], "quantize_attention": "kv"},
            "int-quantized",
        ),
        ("llamagen-tiny", {"w_bits": 4, "a_bits": 8, "quantize_attention": False}, "pack-quantized"),  # W4A8
        ("llamagen-tiny", {"w_bits": 6, "a_bits": None}, "pack-quantized"),  # weight-only, 6-bit codes
    ],
)
def test_the_format_validates_and_its_compressors_give_our_weights(tmp_path, model_name, recipe, compression):
    artifact = _artifact(tmp_path, "art", {"name": "custom", **recipe}, model=model_name)
    summary, config, tensors = _exported(tmp_path, artifact)
    qc = QuantizationConfig.model_validate(config["quantization_config"])
    assert (
        qc.quant_method == "compressed-tensors" and qc.format == compression == summary["compression_format"]
    )
    model, _, manifest = load_artifact(artifact)
    assert qc.quantization_status == "compressed"
    assert qc.ignore == [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]  # left in FP
    assert bool(qc.ignore) == (model_name == "tiny-var")
    modules = dict(iter_quant_modules(model))
    targets = [t for scheme in qc.config_groups.values() for t in scheme.targets]
    assert sorted(targets) == sorted(n for n, m in modules.items() if isinstance(m, QuantLinear))

    for scheme in qc.config_groups.values():
        assert CompressionFormat(scheme.format).value == compression
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        for name in scheme.targets:
            local = _local(tensors, name)
            assert set(compressor.compression_param_names(scheme)) <= set(local)
            weight = compressor.decompress(local, scheme)["weight"]
            assert torch.equal(weight, modules[name].weight.float()), name
            if recipe["a_bits"] is None:
                assert scheme.input_activations is None
                continue
            x = torch.randn(3, 5, modules[name].in_features) * 4
            args = scheme.input_activations
            theirs = fake_quantize(x, local["input_scale"], local["input_zero_point"], args)
            assert torch.allclose(theirs, modules[name].input_quantizer.quantize(x, None), atol=1e-6), name

    if recipe.get("quantize_attention") == "kv":
        kv = qc.kv_cache_scheme
        assert isinstance(kv, QuantizationArgs) and kv.num_bits == 8 and kv.strategy == "tensor"
        for name, module in modules.items():
            if isinstance(module, QuantMatMul):
                attention, operand = name.rsplit(".", 1)[0], "k" if name.endswith("qk") else "v"
                x = torch.randn(2, 4, 6, 16)
                theirs = fake_quantize(
                    x,
                    tensors[f"{attention}.{operand}_scale"],
                    tensors[f"{attention}.{operand}_zero_point"],
                    kv,
                )
                assert torch.allclose(theirs, module.b_quantizer.quantize(x, None), atol=1e-6), name
    else:
        assert qc.kv_cache_scheme is None
    # everything else is the artifact's own tensors, and no quantizer state of ours is left
    stored = load_file(str(artifact / "model.safetensors"))
    for key, value in tensors.items():
        assert "_quantizer." not in key
        if key in stored:
            assert torch.equal(value, stored[key]), key
    assert config["ptq4arvg"]["model"] == model_name and config["ptq4arvg"]["recipe"] == manifest["recipe"]


def test_packing_is_the_formats_own():
    codes = torch.randint(0, 2**6, (3, 37), generator=torch.Generator().manual_seed(0))
    for bits in (2, 4, 6, 8):
        values = codes % (2**bits)
        signed = (values - 2 ** (bits - 1)).to(torch.int8)
        unpacked = unpack_from_int32(pack_rows(values, bits), bits, signed.shape)
        assert torch.equal(unpacked, signed), bits


def test_what_the_format_cannot_express_is_refused_naming_it(tmp_path):
    stwq = _artifact(
        tmp_path, "stwq", {"name": "stwq", "passes": [{"kind": "stwq"}], "quantize_attention": False}
    )
    with pytest.raises(
        ExportError,
        match=r"STWQ.s static per-position-group tables \(a recipe without stwq exports\): layers\.0\.attention\.wqkv",
    ):
        export(stwq, tmp_path / "out")
    dynamic = _artifact(
        tmp_path, "dtwq", {"name": "dt", "passes": [{"kind": "dynamic_token"}], "quantize_attention": False}
    )
    with pytest.raises(ExportError, match=r"dynamic per-token ranges .*: layers\.0\.attention\.wqkv"):
        export(dynamic, tmp_path / "out")
    attention = _artifact(tmp_path, "attn", {"name": "all-attention"})
    with pytest.raises(
        ExportError,
        match=r"quantized attention queries and probabilities .*kv.*: layers\.0\.attention\.matmul_qk",
    ):
        export(attention, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    proc = run_cli(
        "export", str(stwq), "--format", "compressed-tensors", "--out", str(tmp_path / "o"), check=False
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip().splitlines() == [proc.stderr.strip()]
        and "STWQ's static per-position-group tables" in proc.stderr
    )


def test_cli_export_writes_the_folder_and_reports_json(tmp_path):
    artifact = _artifact(tmp_path, "art", {"name": "rtn-w8", "a_bits": None})
    out = tmp_path / "ct"
    proc = run_cli("export", str(artifact), "--format", "compressed-tensors", "--out", str(out), "--json")
    summary = json.loads(proc.stdout)
    assert summary["out"] == str(out) and summary["compression_format"] == "pack-quantized"
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer.safetensors"}
    proc = run_cli("export", str(artifact), "--format", "gguf", "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "argument --format" in proc.stderr and "compressed-tensors" in proc.stderr
    proc = run_cli("export", str(artifact), "--out", str(out), check=False)  # not empty now
    assert proc.returncode == 2 and "not empty" in proc.stderr
