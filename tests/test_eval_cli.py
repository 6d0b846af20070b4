"""`ptq4arvg eval` and `ptq4arvg reference` end to end (tiny sets: the Inception network costs ~0.1 s per
image on this CPU), and their one-line errors."""

import json

import numpy as np
import pytest

from conftest import needs_fashion_mnist, run_cli
from quantcore.zoo.data import load_fashion_mnist, to_rgb32

pytestmark = needs_fashion_mnist


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Every CLI run here on one OpenMP thread: on this shared 2-core machine two threads per process run
    several times slower under load (oversubscription), past run_cli's timeout."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("eval")


@pytest.fixture(scope="module")
def reference(workdir):
    """An ADM-format reference of 8 Fashion-MNIST training images, built by the CLI."""
    images = to_rgb32(load_fashion_mnist("train")[0][:8])
    np.savez(workdir / "images.npz", arr_0=images)
    out = workdir / "ref.npz"
    summary = json.loads(
        run_cli("reference", str(workdir / "images.npz"), "--out", str(out), "--json").stdout
    )
    assert summary["num_images"] == 8 and summary["sfid"]
    return out


@pytest.fixture(scope="module")
def artifact(workdir, reference):
    """A W6A6 artifact whose job also measured Inception metrics (the manifest holds them)."""
    out = workdir / "art"
    proc = run_cli(
        "quantize", "tiny-llamagen", "--recipe", "rtn", "--w-bits", "6", "--a-bits", "6",
        "--calib-samples", "2", "--batch-size", "2", "--eval-images", "4",
        "--eval-metrics", "fid,precision,sfid_vs_fp", "--eval-ref", str(reference),
        "--out", str(out), "--json", "--no-progress",
    )  # fmt: skip
    return out, json.loads(proc.stdout)


def test_a_quantize_job_records_the_inception_metrics_in_its_manifest(artifact):
    out, summary = artifact
    inception = json.loads((out / "manifest.json").read_text())["metrics"]["inception"]
    assert summary["metrics"]["inception"] == inception
    assert set(inception["metrics"]) == {"fid", "precision", "sfid_vs_fp"}
    assert {"value", "ci95", "fp", "noise_floor"} <= inception["metrics"]["fid"].keys()
    assert inception["reference"]["name"] == "ref.npz" and inception["num_images"] == 4
    assert "token_agreement" in summary["metrics"]  # from the same samples


def test_eval_of_an_artifact_measures_against_reference_and_fp(artifact, reference, workdir):
    out = workdir / "result.json"
    proc = run_cli(
        "eval", str(artifact[0]), "--ref", str(reference), "--num-images", "4", "--batch-size", "4",
        "--bootstrap", "5", "--out", str(out),
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["kind"] == "artifact" and result["model"] == "tiny-llamagen" and result["num_images"] == 4
    metrics = result["metrics"]
    assert set(metrics) == {"fid", "sfid", "precision", "recall", "fid_vs_fp", "sfid_vs_fp"}
    for name in ("fid", "sfid", "precision", "recall"):
        assert {"value", "ci95", "fp", "noise_floor"} <= metrics[name].keys()
    assert metrics["fid_vs_fp"]["value"] > 0 and "noise_floor" in metrics["fid_vs_fp"]
    lo, hi = metrics["fid"]["ci95"]
    assert lo <= metrics["fid"]["value"] <= hi
    assert result["reference"]["name"] == "ref.npz" and result["reference"]["num_images"] == 8
    # for people: one row per metric with the value, interval, FP value and noise floor
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[2:-1]}
    assert set(rows) == set(metrics) and rows["fid"][1] == f"{metrics['fid']['value']:.2f}"
    assert "fp_other_seeds" in proc.stderr  # progress bar stages


def test_eval_of_a_bundled_model_defaults_to_the_fashion_mnist_test_split(tmp_path, monkeypatch):
    monkeypatch.setenv("PTQ4ARVG_CACHE", str(tmp_path))
    proc = run_cli(
        "eval", "tiny-llamagen", "--num-images", "2", "--batch-size", "2", "--ref-images", "4",
        "--metrics", "fid,sfid", "--no-noise-floor", "--json", "--no-progress",
    )  # fmt: skip
    result = json.loads(proc.stdout)
    assert result["kind"] == "model" and result["reference"]["name"] == "fashion-mnist-test[:4]"
    assert set(result["metrics"]) == {"fid", "sfid"} and "fp" not in result["metrics"]["fid"]
    assert list((tmp_path / "references").glob("fashion-mnist-test-4-*.npz"))  # cached for the next run


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ref", "missing.npz"], "error: --ref: reference missing.npz not found"),
        (["--ref", "BAD"], "is not an .npz file"),
        (["--num-images", "3"], "error: --num-images: 3 is too few for fid, sfid, precision, recall"),
        (["--num-images", "1", "--metrics", "fid"], "a covariance needs 2 images"),
        (["--metrics", "is"], "unknown metric 'is'"),
    ],
)
def test_eval_bad_inputs_are_one_line_errors(tmp_path, monkeypatch, extra, message):
    monkeypatch.setenv("PTQ4ARVG_CACHE", str(tmp_path))
    (tmp_path / "bad.npz").write_text("not a zip")
    extra = [str(tmp_path / "bad.npz") if e == "BAD" else e for e in extra]
    args = ["eval", "tiny-llamagen", "--num-images", "4", "--ref-images", "8", *extra, "--no-progress"]
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_reference_from_a_folder_without_images_is_a_one_line_error(tmp_path):
    proc = run_cli("reference", str(tmp_path), "--out", str(tmp_path / "r.npz"), check=False)
    assert (
        proc.returncode == 2
        and proc.stderr.strip() == f"error: {tmp_path} holds no images (.png, .jpg, .jpeg, .bmp, .webp)"
    )
