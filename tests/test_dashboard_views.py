"""The dashboard's readings of job metrics and manifests, and its server-drawn SVG plots."""

from __future__ import annotations

import datetime as dt
import xml.etree.ElementTree as ET

from app import schemas
from app.web import plots, views

SVG = "{http://www.w3.org/2000/svg}"
INCEPTION = {
    "metrics": {
        "fid": {"value": 12.5, "ci95": [11.0, 14.0], "fp": 11.9, "noise_floor": 1.2},
        "fid_vs_fp": {"value": 3.25, "ci95": [2.5, 4.0], "noise_floor": 0.8},
    },
    "num_images": 64,
}


def job(recipe: str, w: int, a: int | None, metrics: dict) -> schemas.JobOut:
    now = dt.datetime.now(dt.UTC)
    return schemas.JobOut(
        id=f"{recipe}-{w}-{a}",
        owner="o",
        state="succeeded",
        spec=schemas.JobSpec(model="tiny-llamagen", recipe=recipe, w_bits=w, a_bits=a),
        progress=schemas.JobProgress(stage="done", stage_percent=100, percent=100),
        cancel_requested=False,
        attempt=1,
        worker=None,
        error=None,
        artifact_id="art",
        metrics=metrics,
        created_at=now,
        started_at=now,
        finished_at=now,
    )


def test_metric_rows_carry_intervals_fp_and_noise_floor():
    rows = views.metric_rows({"inception": INCEPTION, "logit_kl": 0.01, "token_agreement": 0.5})
    by_name = {r.name: r for r in rows}
    assert by_name["FID"] == views.MetricRow("FID", 12.5, (11.0, 14.0), 11.9, 1.2, "Inception features")
    assert by_name["FID vs FP"].fp is None and by_name["FID vs FP"].noise_floor == 0.8
    assert by_name["Logit KL to FP"].value == 0.01
    assert "Top-1 agreement with FP" not in by_name  # absent from the metrics: not invented


def test_metric_vs_bits_plot_draws_one_line_per_recipe_newest_job_wins():
    jobs = [
        job("ptq4arvg", 6, 6, {"logit_kl": 0.05}),  # newest first, as the job list answers
        job("ptq4arvg", 6, 6, {"logit_kl": 9.0}),
        job("ptq4arvg", 8, 8, {"logit_kl": 0.01}),
        job("rtn", 8, 8, {"logit_kl": 0.02}),
    ]
    (chart,) = views.metric_vs_bits_plots(jobs)
    root = ET.fromstring(str(chart))
    assert root.get("role") == "img"
    desc = root.find(f"{SVG}desc").text
    assert desc == "ptq4arvg: W6A6 0.05, W8A8 0.01; rtn: W8A8 0.02"
    assert len(root.findall(f"{SVG}polyline")) == 1  # rtn has one point: a dot, no line
    assert len(root.findall(f"{SVG}circle")) == 3
    ticks = [t.text for t in root.iter(f"{SVG}text") if t.text in ("W6A6", "W8A8")]
    assert ticks == ["W6A6", "W8A8"]


def test_plots_escape_their_labels():
    chart = plots.bar_chart("<script>", [("layer<1>", 2.0), ("b&c", 1.0)], "scale")
    root = ET.fromstring(str(chart))  # well-formed: the labels were escaped
    labels = [t.text for t in root.iter(f"{SVG}text")]
    assert "layer<1>" in labels and "b&c" in labels
    widths = [float(r.get("width")) for r in root.iter(f"{SVG}rect")]
    assert widths[0] == 2 * widths[1]


def test_layer_rows_read_quantizers_and_execution_paths():
    manifest = {
        "layers": {
            "l.wqkv": {
                "kind": "linear",
                "weight": {"kind": "uniform", "bits": 6, "granularity": "row"},
                "input": {"kind": "uniform", "bits": 6, "granularity": "group", "num_groups": 2},
            },
            "l.qk": {
                "kind": "matmul",
                "a": {"kind": "uniform", "bits": 8, "granularity": "tensor"},
                "b": {"kind": "uniform", "bits": 8, "granularity": "tensor"},
            },
        },
        "execution": {
            "layers": {"l.wqkv": {"path": "int8-cpu"}, "l.qk": {"path": "simulated", "reason": "a x a"}}
        },
        "weight_storage": {"l.wqkv": {"bits": 6, "packing": 4}},
    }
    linear, matmul = views.layer_rows(manifest)
    assert (linear.weight, linear.activation) == ("6-bit uniform / row", "6-bit uniform / group (2 groups)")
    assert (linear.path, linear.storage) == ("int8-cpu", "6-bit codes, packed 4")
    assert (matmul.path, matmul.reason, matmul.storage) == ("simulated", "a x a", "-")
    assert views.layer_rows({"layers": "not a mapping"}) == []


def test_execution_summary_shows_the_plan_and_what_its_kernels_change():
    manifest = {
        "execution": {
            "name": "NVIDIA H200",
            "objective": "speed",
            "layers": {"a": {"path": "fp8-gpu"}, "b": {"path": "fp8-gpu"}, "c": {"path": "simulated"}},
            "vs_simulated": {"logit_kl": 0.000582226, "top1_agreement": 0.985352, "sequences": 16},
        }
    }
    assert views.execution_summary(manifest) == [
        ("device", "NVIDIA H200"),
        ("objective", "speed"),
        ("layers per path", "fp8-gpu: 2, simulated: 1"),
        ("real vs simulated", "logit_kl: 0.0005822, top1_agreement: 0.9854, sequences: 16"),
    ]
    planned_at_load = {"execution": {"name": "cpu", "layers": {"a": {"path": "int8-cpu"}}}}
    assert views.execution_summary(planned_at_load)[1:] == [
        ("objective", "-"),
        ("layers per path", "int8-cpu: 1"),
    ]
    assert views.execution_summary({}) == [] and views.execution_summary({"execution": [1]}) == []
