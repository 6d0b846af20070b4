import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
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
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "ptq4arvg quantize: error: argument --w-bits: invalid choice: 9 (choose from 2, 3, 4, 5, 6, 7, 8) "
        "(see ptq4arvg quantize --help)"
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


def _entry(*args, cwd, env_extra=None) -> subprocess.CompletedProcess:
    """The installed `ptq4arvg` script (engine + service commands), with no PTQ4ARVG_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PTQ4ARVG_")} | (env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "app.entry", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _recipe_file(tmp_path: Path, recipe: dict) -> str:
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    return str(path)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (
            ["quantize", "llamagen-tiny", "--recipe-file", "/no/such/recipe.yaml"],
            ["--recipe-file", "no such file"],
        ),
        (
            ["quantize", "llamagen-tiny", "--recipe-file", "{bad_recipe}"],
            ["--recipe-file", "alpha", "less than or equal to 1"],
        ),
        (["quantize", "llamagen-tiny", "--calib-samples", "1"], ["--calib-samples", "allowed: 2 to 100000"]),
        (
            ["quantize", "llamagen-tiny", "--selection", "best"],
            ["--selection", "'dgc-official'", "'uniform'"],
        ),
        (["quantize", "llamagen-tiny", "--a-bits", "1"], ["--a-bits", "choose from 0, 2, 3"]),
        (["quantize", "llamagen-tiny", "--recipe", "gptq"], ["--recipe", "presets are rtn"]),
        (["generate", "llamagen-tiny", "--classes", "1", "--top-p", "3"], ["--top-p must be in (0, 1]"]),
        (["eval", "tiny-llamagen", "--num-images", "0"], ["--num-images", "too few"]),
    ],
)
def test_user_mistakes_end_in_one_line_naming_the_flag(tmp_path, args, needles):
    bad_recipe = _recipe_file(tmp_path, {"passes": [{"kind": "smoothquant", "alpha": 5}]})
    args = [a.replace("{bad_recipe}", bad_recipe) for a in args]
    out = (
        [] if args[0] == "eval" else ["--out", str(tmp_path / ("o.png" if args[0] == "generate" else "art"))]
    )
    proc = run_cli(*args, *out, "--no-progress", check=False)
    _one_line_error(proc, *needles)
    assert not (tmp_path / "art").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_names_the_flag_and_the_choices(tmp_path):
    proc = run_cli("quantize", "llamagen-tiny", "--device", "cuda", "--out", str(tmp_path / "a"), check=False)
    _one_line_error(proc, "--device 'cuda'", "no CUDA device", "use auto or cpu")


def test_an_unwritable_out_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # a random-weights model warns when it is loaded: no warning = refused before loading anything
    proc = run_cli("quantize", "llamagen-tiny", "--out", str(blocker / "art"), "--no-progress", check=False)
    _one_line_error(proc, f"--out {blocker / 'art'}", "is not a folder")
    proc = run_cli("quantize", "llamagen-tiny", "--out", "/proc/no-such/art", "--no-progress", check=False)
    _one_line_error(proc, "--out /proc/no-such/art", "cannot write under /proc")
    full = tmp_path / "full"
    (full / "x").mkdir(parents=True)
    proc = run_cli("quantize", "llamagen-tiny", "--out", str(full), "--no-progress", check=False)
    _one_line_error(proc, "not empty")
    proc = run_cli("generate", "llamagen-tiny", "--classes", "1", "--out", str(tmp_path), check=False)
    _one_line_error(proc, "is a folder; give a file name")


def test_eval_images_0_is_reported_without_nan(tmp_path):
    proc = run_cli(
        "quantize",
        "llamagen-tiny",
        "--recipe",
        "rtn",
        "--calib-samples",
        "2",
        "--eval-images",
        "0",
        "--out",
        str(tmp_path / "art"),
        "--no-progress",
    )
    assert "no fidelity metrics (--eval-images 0)" in proc.stdout and "nan" not in proc.stdout


def test_models_shows_trained_or_random_weights_and_class_names():
    models = {m["name"]: m for m in json.loads(run_cli("models", "--json").stdout)}
    assert models["tiny-llamagen"]["weights"] == "trained" and models["llamagen-tiny"]["weights"] == "random"
    assert (
        models["tiny-var"]["class_names"][0] == "T-shirt/top" and len(models["tiny-var"]["class_names"]) == 10
    )
    assert models["llamagen-xl"]["class_names"] is None
    text = run_cli("models").stdout
    tiny = next(line for line in text.splitlines() if line.startswith("tiny-llamagen "))
    assert " trained " in tiny and "9 Ankle boot" in text


def test_admin_help_lists_its_subcommands(tmp_path):
    proc = _entry("admin", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    for command in ("create-key", "list-keys", "revoke-key", "migrate", "sync-models"):
        assert command in proc.stdout
    _one_line_error(_entry("admin", cwd=tmp_path), "required", "create-key")
    _one_line_error(_entry("serve", "--port", "99999", cwd=tmp_path), "--port", "1..65535")
    proc = _entry("serve", "--var-dir", "/proc/no-such/var", cwd=tmp_path)
    _one_line_error(proc, "--var-dir /proc/no-such/var", "cannot write under /proc")
    proc = _entry("admin", "--var-dir", "/proc/no-such/var", "migrate", cwd=tmp_path)
    _one_line_error(proc, "cannot create /proc/no-such")


def test_admin_outside_the_checkout_says_where_its_database_is(tmp_path):
    proc = _entry("admin", "create-key", "--owner", "bob", cwd=tmp_path)
    _one_line_error(
        proc, f"no database at {tmp_path / 'var' / 'ptq4arvg.db'}", "--var-dir", "PTQ4ARVG_DATABASE_URL"
    )
    assert not (tmp_path / "var").exists()  # nothing created silently
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    proc = _entry(
        "admin", "list-keys", cwd=tmp_path, env_extra={"PTQ4ARVG_DATABASE_URL": f"sqlite:///{empty}"}
    )
    _one_line_error(proc, str(empty), "no such table", "ptq4arvg admin migrate")

    var = tmp_path / "deploy"
    assert _entry("admin", "--var-dir", str(var), "migrate", cwd=tmp_path).returncode == 0
    created = _entry("admin", "--var-dir", str(var), "create-key", "--owner", "bob", "--json", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    listed = _entry("admin", "list-keys", "--json", cwd=tmp_path, env_extra={"PTQ4ARVG_VAR_DIR": str(var)})
    assert [(k["id"], k["owner"], k["revoked"]) for k in json.loads(listed.stdout)] == [
        (key["id"], "bob", False)
    ]
