import json
import subprocess
import sys

import pytest

from conftest import needs_fashion_mnist, run_cli
from quantcore.compare import plan_rows
from quantcore.errors import ConfigError

# the report's proxy metrics read the Fashion-MNIST test split (.ci/run installs the Debian package)
TINY = [
    "compare",
    "tiny-llamagen",
    "--recipes",
    "fp,rtn,ptq4arvg",
    "--bits",
    "w6a6",
    "--num-images",
    "10",
    "--calib-samples",
    "4",
    "--heldout",
    "8",
    "--reference-images",
    "100",
    "--batch-size",
    "10",
    "--threads",
    "1",
]
ROW_KEYS = {"token_agreement", "logit_kl", "top1_agreement", "proxy_fid_test", "proxy_is"}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same compare twice, side by side (one core each), as two separate processes."""
    outs = [tmp_path_factory.mktemp(name) for name in ("a", "b")]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "quantcore", *TINY, "--out", str(out), "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for out in outs
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return outs, results


@needs_fashion_mnist
def test_compare_writes_report_timings_and_grids(two_runs):
    (out, _), (proc, _) = two_runs
    report = json.loads(proc.stdout)
    assert report == json.loads((out / "report.json").read_text())
    assert [r["label"] for r in report["rows"]] == [
        "fp",
        "rtn-w6a6-dgc-official",
        "ptq4arvg-w6a6-dgc-official",
    ]
    assert report["proxy_metrics"] and report["heldout_source"] == "fashion-mnist test split"
    fp, rtn, ours = report["rows"]
    assert fp["metrics"]["token_agreement"] == 1.0 and fp["metrics"]["logit_kl"] == 0.0
    for row in (rtn, ours):
        assert ROW_KEYS | {"proxy_fid_vs_fp", "proxy_class_accuracy"} <= row["metrics"].keys()
        assert row["selection"]["selection"] == "dgc-official" and row["selection"]["pool_size"] == 8
        assert sum(row["selection"]["counts"].values()) == 4
        assert (out / row["grid"]).is_file()
    timings = json.loads((out / "timings.json").read_text())
    assert timings["rows"]["rtn-w6a6-dgc-official"]["calibration_seconds"] > 0
    assert "peak_rss_delta_mib" in timings["rows"]["ptq4arvg-w6a6-dgc-official"]
    md = (out / "report.md").read_text()
    assert "| w6a6 | ptq4arvg |" in md and "proxy-FID vs FP" in md and "×" in md
    assert "[2/3] rtn-w6a6-dgc-official" in proc.stderr  # progress bar on stderr


@needs_fashion_mnist
def test_compare_json_is_identical_across_runs(two_runs):
    outs, procs = two_runs
    assert (outs[0] / "report.json").read_bytes() == (outs[1] / "report.json").read_bytes()
    assert procs[0].stdout == procs[1].stdout
    for name in ("grid-fp.png", "grid-ptq4arvg-w6a6-dgc-official.png"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--recipes", "fp,quarot", "error: --recipes: unknown recipe 'quarot'"),
        ("--bits", "w8x8", "error: --bits: 'w8x8'"),
        ("--bits", "w9a8", "error: --bits: 'w9a8'"),
        ("--num-images", "1", "error: --num-images: "),
    ],
)
def test_bad_options_are_one_line_naming_the_option(tmp_path, option, value, message):
    args = list(TINY)
    args[args.index(option) + 1] = value
    proc = run_cli(*args, "--out", str(tmp_path / "x"), "--no-progress", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith(message), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_plan_rows_crosses_recipes_bits_and_selections():
    rows = plan_rows(["fp", "rtn"], ["W8A8", "w4"], ["random", "uniform"])
    assert [r.label for r in rows] == [
        "fp",
        "rtn-w8a8-random",
        "rtn-w8a8-uniform",
        "rtn-w4-random",
        "rtn-w4-uniform",
    ]
    with pytest.raises(ConfigError, match="^--selection: unknown selection 'dgc'"):
        plan_rows(["rtn"], ["w8a8"], ["dgc"])


def test_plan_rows_crosses_executions_and_refuses_unknown_ones():
    rows = plan_rows(["fp", "ptq4arvg"], ["w8a8"], ["random"], ["simulated", "real"])
    assert [r.label for r in rows] == ["fp", "ptq4arvg-w8a8-random", "ptq4arvg-w8a8-random-real"]
    with pytest.raises(ConfigError, match="^--execution: 'fake': choose from simulated, real"):
        plan_rows(["rtn"], ["w8a8"], ["random"], ["fake"])


@needs_fashion_mnist
def test_real_rows_run_the_integer_kernels_and_match_the_simulated_row(tmp_path):
    from quantcore.compare import CompareSpec, run_compare

    rows = plan_rows(["ptq4arvg"], ["w8a8"], ["random"], ["simulated", "real"])
    spec = CompareSpec(
        model="tiny-llamagen",
        rows=rows,
        num_images=10,
        calib_samples=4,
        heldout=8,
        reference_images=100,
        batch_size=10,
        grid_images=4,
    )
    simulated, real = run_compare(spec, tmp_path)["rows"]
    assert simulated["execution"] == "simulated" and "execution_paths" not in simulated
    assert real["execution"] == "real" and real["execution_paths"]["int8-cpu"] > 0
    # the same parameters through int8 GEMMs: the teacher-forced metrics agree closely
    kl_sim, kl_real = simulated["metrics"]["logit_kl"], real["metrics"]["logit_kl"]
    assert abs(kl_real - kl_sim) <= 0.2 * kl_sim
    assert abs(real["metrics"]["top1_agreement"] - simulated["metrics"]["top1_agreement"]) <= 0.05
    # and directly against the simulated model: the integer GEMMs round the float results differently,
    # so an activation code at a rounding midpoint can move by one step; far less than quantization moves
    against = real["vs_simulated"]
    assert set(against) == {"logit_kl", "top1_agreement", "token_agreement"}
    assert 0 <= against["logit_kl"] < 0.2 * kl_sim and against["top1_agreement"] >= 0.95
    assert against["token_agreement"] > simulated["metrics"]["token_agreement"]
    assert "ptq4arvg-w8a8-random-real: logit_kl" in (tmp_path / "report.md").read_text()


@needs_fashion_mnist
def test_inception_columns_sit_beside_the_proxies_with_intervals(tmp_path, monkeypatch):
    monkeypatch.setenv("PTQ4ARVG_CACHE", str(tmp_path / "cache"))
    args = ["compare", "tiny-llamagen", "--recipes", "fp,rtn", "--bits", "w8a8", "--num-images", "4"]
    args += ["--calib-samples", "2", "--heldout", "4", "--reference-images", "8", "--batch-size", "4"]
    proc = run_cli(
        *args, "--inception", "--bootstrap", "5", "--out", str(tmp_path / "r"), "--json", "--no-progress"
    )
    report = json.loads(proc.stdout)
    assert report["inception_reference"]["name"] == "fashion-mnist-test[:8]"
    fp, rtn = (row["metrics"] for row in report["rows"])
    assert {"fid", "fid_ci95", "sfid", "precision", "recall"} <= fp.keys() and "fid_vs_fp" not in fp
    assert {"fid_vs_fp", "fid_vs_fp_ci95", "sfid_vs_fp", "proxy_fid_test", "proxy_fid_vs_fp"} <= rtn.keys()
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| FID | sFID | precision | recall | FID vs FP | sFID vs FP |" in md and "proxy-FID test" in md
    lo, hi = rtn["fid_vs_fp_ci95"]
    assert f"{rtn['fid_vs_fp']:.2f} [{lo:.2f}, {hi:.2f}]" in md
