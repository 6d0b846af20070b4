import json

import numpy as np
import torch
from PIL import Image

from conftest import random_llamagen, run_cli
from quantcore.tokenizers import VQ_CONFIGS, VQModel


def test_models_json_lists_registry():
    models = {m["name"]: m for m in json.loads(run_cli("models", "--json").stdout)}
    xl = models["llamagen-xl"]
    assert xl["family"] == "llamagen" and xl["official_checkpoints"][0] == "c2i_XL_384.pt"
    assert abs(xl["parameters"] - 775e6) / 775e6 < 0.01
    assert models["par-xl-4x"]["sampling"]["cfg_scale"] == 1.5 and models["par-xl-4x"]["tokens"] == 576
    assert "llamagen-b" in run_cli("models").stdout


def test_generate_writes_png_with_progress_and_warning(tmp_path):
    out = tmp_path / "grid.png"
    proc = run_cli("generate", "par-tiny", "--classes", "1,2,3", "--seed", "5", "--out", str(out), "--json")
    result = json.loads(proc.stdout)
    assert result["seeds"] == [5, 6, 7]
    assert "random weights" in proc.stderr and "generate par-tiny" in proc.stderr  # warning + progress bar
    image = np.asarray(Image.open(out))
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


def test_generate_with_checkpoint_is_deterministic(tmp_path):
    ckpt, vq_ckpt = tmp_path / "tiny.pt", tmp_path / "vq.pt"
    torch.save({"model": random_llamagen("llamagen-tiny").state_dict()}, ckpt)
    torch.save({"model": VQModel(VQ_CONFIGS["VQ-tiny"]).state_dict()}, vq_ckpt)
    outs = []
    for name in ("a.png", "b.png"):
        run_cli(
            "generate",
            "llamagen-tiny",
            "--checkpoint",
            str(ckpt),
            "--tokenizer-checkpoint",
            str(vq_ckpt),
            "--classes",
            "1,2",
            "--out",
            str(tmp_path / name),
            "--no-progress",
        )
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1]


def test_cli_errors_are_one_line_and_nonzero(tmp_path):
    proc = run_cli(
        "generate", "no-such-model", "--classes", "1", "--out", str(tmp_path / "x.png"), check=False
    )
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: unknown model 'no-such-model'")
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli(
        "generate", "llamagen-tiny", "--classes", "1,99", "--out", str(tmp_path / "x.png"), check=False
    )
    assert proc.returncode == 2 and "out of range" in proc.stderr
    proc = run_cli(
        "generate", "llamagen-tiny", "--classes", "a,b", "--out", str(tmp_path / "x.png"), check=False
    )
    assert proc.returncode == 2 and "comma-separated integers" in proc.stderr


def test_quantize_writes_artifact_and_reports_json(tmp_path):
    out = tmp_path / "art"
    proc = run_cli(
        "quantize",
        "par-tiny",
        "--recipe",
        "ptq4arvg",
        "--w-bits",
        "6",
        "--a-bits",
        "6",
        "--calib-samples",
        "4",
        "--batch-size",
        "4",
        "--eval-images",
        "2",
        "--out",
        str(out),
        "--json",
    )
    summary = json.loads(proc.stdout)
    assert summary["recipe"]["w_bits"] == 6 and "token_agreement" in summary["metrics"]
    assert "gps" in proc.stderr and "calibrate" in proc.stderr  # per-stage progress
    assert (out / "manifest.json").is_file()
    proc = run_cli(
        "generate", str(out), "--classes", "1,2", "--out", str(tmp_path / "q.png"), "--no-progress"
    )
    assert (tmp_path / "q.png").is_file()


def test_quantize_bad_input_is_one_line(tmp_path):
    proc = run_cli(
        "quantize", "par-tiny", "--w-bits", "9", "--out", str(tmp_path / "a"), "--no-progress", check=False
    )
    assert (
        proc.returncode == 2
        and proc.stderr.strip() == "error: w_bits: Input should be less than or equal to 8"
    )
    proc = run_cli(
        "quantize",
        "par-tiny",
        "--recipe",
        "quarot",
        "--out",
        str(tmp_path / "a"),
        "--no-progress",
        check=False,
    )
    assert proc.returncode == 2 and "unknown preset 'quarot'" in proc.stderr
