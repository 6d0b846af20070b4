"""What the pages show, read from the REST API's own response models (JobOut, ArtifactOut) and the
artifact manifest: metric rows, the per-layer table, the plots' data. Reading only, no decisions."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from markupsafe import Markup

from app import schemas
from app.web import plots

# fidelity to the FP model under the same classes and seeds (every job with evaluation images has them)
FIDELITY = {
    "token_agreement": ("Token agreement with FP", "higher is better", "fraction of tokens identical"),
    "top1_agreement": ("Top-1 agreement with FP", "higher is better", "teacher-forced argmax agrees"),
    "logit_kl": ("Logit KL to FP", "lower is better", "teacher-forced KL(FP || quantized)"),
}
INCEPTION = {
    "fid": "FID",
    "sfid": "sFID",
    "precision": "Precision",
    "recall": "Recall",
    "fid_vs_fp": "FID vs FP",
    "sfid_vs_fp": "sFID vs FP",
}
GRID_IMAGES = 10  # one image per class of the bundled models (Fashion-MNIST has 10)
PLOTTED = {"logit_kl": "Logit KL to FP", "token_agreement": "Token agreement", "fid_vs_fp": "FID vs FP"}


def section(manifest: dict[str, Any], key: str) -> dict[str, Any]:
    """A mapping of the manifest, or {} (manifests of other engines or older formats may lack it)."""
    value = manifest.get(key)
    return value if isinstance(value, dict) else {}


def bits_label(w_bits: int, a_bits: int | None) -> str:
    return f"W{w_bits}A{a_bits}" if a_bits else f"W{w_bits}"


def _bits_order(label: str) -> tuple[int, int]:
    w, _, a = label.removeprefix("W").partition("A")
    return int(w), int(a or 0)


@dataclasses.dataclass(frozen=True)
class MetricRow:
    name: str
    value: float | None
    ci95: tuple[float, float] | None = None
    fp: float | None = None
    noise_floor: float | None = None
    note: str = ""


def inception_entries(metrics: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The job's Inception metrics, name -> {value, ci95, fp, noise_floor}."""
    inception = (metrics or {}).get("inception") or {}
    entries = inception.get("metrics", inception)
    return {k: v for k, v in entries.items() if isinstance(v, dict) and "value" in v}


def metric_rows(metrics: dict[str, Any] | None) -> list[MetricRow]:
    metrics = metrics or {}
    rows = [
        MetricRow(
            INCEPTION.get(name, name),
            e["value"],
            tuple(e["ci95"]) if e.get("ci95") else None,
            e.get("fp"),
            e.get("noise_floor"),
            "Inception features",
        )
        for name, e in inception_entries(metrics).items()
    ]
    for key, (label, direction, how) in FIDELITY.items():
        if isinstance(metrics.get(key), int | float):
            rows.append(MetricRow(label, float(metrics[key]), note=f"{how}; {direction}"))
    return rows


def flat_metrics(metrics: dict[str, Any] | None) -> dict[str, float]:
    """Every plotted/compared number of a job by key (fidelity and Inception values)."""
    metrics = metrics or {}
    out = {k: float(metrics[k]) for k in FIDELITY if isinstance(metrics.get(k), int | float)}
    out.update({k: float(e["value"]) for k, e in inception_entries(metrics).items()})
    return out


@dataclasses.dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str
    weight: str
    activation: str
    path: str
    reason: str
    storage: str


def _quantizer(q: dict[str, Any] | None) -> str:
    if not q:
        return "float"
    text = f"{q.get('bits')}-bit {q.get('kind', '')} / {q.get('granularity', '?')}"
    if q.get("granularity") == "group":
        text += f" ({q.get('num_groups')} groups)"
    return text


def layer_rows(manifest: dict[str, Any]) -> list[LayerRow]:
    execution = section(section(manifest, "execution"), "layers")
    storage = section(manifest, "weight_storage")
    rows = []
    for name, layer in section(manifest, "layers").items():
        is_matmul = layer.get("kind") == "matmul"
        path = execution.get(name) or {}
        stored = storage.get(name)
        rows.append(
            LayerRow(
                name=name,
                kind=layer.get("kind", "?"),
                weight=_quantizer(layer.get("a")) + " (A)" if is_matmul else _quantizer(layer.get("weight")),
                activation=_quantizer(layer.get("b")) + " (B)"
                if is_matmul
                else _quantizer(layer.get("input")),
                path=path.get("path", "-"),
                reason=path.get("reason", ""),
                storage=f"{stored['bits']}-bit codes, packed {stored['packing']}" if stored else "-",
            )
        )
    return rows


def stage_rows(manifest: dict[str, Any], metrics: dict[str, Any] | None) -> list[tuple[str, float]]:
    """Seconds per stage: the job's timings (with the total), else the manifest's."""
    timings = (metrics or {}).get("timings") or section(manifest, "timings")
    return [(k, float(v)) for k, v in timings.items() if isinstance(v, int | float)]


def per_layer_plots(manifest: dict[str, Any]) -> list[Markup]:
    """Bars of what the manifest records per layer: each pass's scale range (how strongly that layer's
    activations had to be rescaled, i.e. its outliers) and any per-layer error a pass records."""
    charts = []
    for pass_name, per_layer in section(manifest, "scales").items():
        if not isinstance(per_layer, dict):
            continue
        for key, meaning in (
            ("error", "quantization error"),
            ("max", "largest scale"),
            ("abs_max", "largest shift"),
        ):
            bars = [
                (layer, float(v[key])) for layer, v in per_layer.items() if isinstance(v, dict) and key in v
            ]
            if bars:
                charts.append(
                    plots.bar_chart(f"{pass_name}: {meaning} per layer", bars, f"{pass_name} {key}")
                )
                break
    return charts


def metric_vs_bits_plots(jobs: list[schemas.JobOut]) -> list[Markup]:
    """For succeeded jobs of one model: each metric against the bit-width, one line per recipe."""
    by_metric: dict[str, dict[str, dict[str, float]]] = {}
    labels: set[str] = set()
    for job in jobs:  # newest first: a recipe's newest job at a bit-width is the point drawn
        label = bits_label(job.spec.w_bits, job.spec.a_bits)
        for key, value in flat_metrics(job.metrics).items():
            if key in PLOTTED:
                by_metric.setdefault(key, {}).setdefault(job.spec.recipe_name, {}).setdefault(label, value)
                labels.add(label)
    x = sorted(labels, key=_bits_order)
    return [
        plots.line_chart(f"{PLOTTED[key]} vs bit-width, per recipe", x, series, PLOTTED[key])
        for key, series in by_metric.items()
    ]


@dataclasses.dataclass(frozen=True)
class Grid:
    """Images of one source under the evaluation seeds, drawn by the dashboard's grid route."""

    title: str
    source: str  # "model:NAME" or "artifact:ID"
    classes: list[int]
    seed: int

    @property
    def query(self) -> dict[str, str]:
        return {"source": self.source, "classes": ",".join(map(str, self.classes)), "seed": str(self.seed)}


def report_grids(job: schemas.JobOut, manifest: dict[str, Any]) -> list[Grid]:
    """The FP model and the artifact under the same classes and seeds (the evaluation's)."""
    if job.artifact_id is None:
        return []
    num_classes = section(section(manifest, "model"), "config").get("num_classes") or GRID_IMAGES
    classes = list(range(min(GRID_IMAGES, num_classes)))
    seed = job.spec.evaluation.seed
    fp_model = job.spec.checkpoint or job.spec.model  # a registered checkpoint is generated by its name
    return [
        Grid(f"FP ({fp_model})", f"model:{fp_model}", classes, seed),
        Grid(
            f"Quantized ({job.spec.recipe_name} {bits_label(job.spec.w_bits, job.spec.a_bits)})",
            f"artifact:{job.artifact_id}",
            classes,
            seed,
        ),
    ]


def calibration_summary(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    calibration = section(manifest, "calibration")
    rows = []
    for key, value in calibration.items():
        if key == "indices" and isinstance(value, list):
            shown = ", ".join(map(str, value[:24])) + (" …" if len(value) > 24 else "")
            rows.append((f"selected indices ({len(value)})", shown))
        elif isinstance(value, dict):
            rows.append((key, ", ".join(f"{k}: {plots_number(v)}" for k, v in value.items())))
        else:
            rows.append((key, plots_number(value)))
    return rows


def execution_summary(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """The planned execution: the device it was planned on, the objective, layers per path and what the
    planned kernels change against the simulated model (`vs_simulated`); [] where nothing was planned."""
    execution = section(manifest, "execution")
    if not execution:
        return []
    rows = [
        ("device", str(execution.get("name", "?"))),
        ("objective", str(execution.get("objective") or "-")),
    ]
    paths = collections.Counter(
        str(e.get("path", "?")) for e in section(execution, "layers").values() if isinstance(e, dict)
    )
    if paths:
        rows.append(("layers per path", ", ".join(f"{p}: {n}" for p, n in sorted(paths.items()))))
    against = section(execution, "vs_simulated")
    if against:
        rows.append(("real vs simulated", ", ".join(f"{k}: {plots_number(v)}" for k, v in against.items())))
    return rows


def plots_number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@dataclasses.dataclass(frozen=True)
class ArtifactRow:
    """An artifact as the lists show it: what the job asked for, and where its weights came from."""

    artifact: schemas.ArtifactOut
    job: schemas.JobOut

    @property
    def manifest_sha256(self) -> str | None:
        return next((f.sha256 for f in self.artifact.files if f.name == "manifest.json"), None)

    @property
    def provenance(self) -> list[str]:
        manifest = self.artifact.manifest
        model, calibration = section(manifest, "model"), section(manifest, "calibration")
        versions, execution = section(manifest, "versions"), section(manifest, "execution")
        if model.get("checkpoint"):
            weights = f"checkpoint {model['checkpoint']}"
        elif self.job.spec.checkpoint:
            weights = f"checkpoint {self.job.spec.checkpoint}"
        else:
            weights = "random weights" if model.get("random_weights") else "the model's own weights"
        lines = [f"{self.job.spec.model} with {weights}"]
        if calibration:
            lines.append(
                f"calibration: {calibration.get('num_samples')} images, {calibration.get('selection')}, "
                f"seed {calibration.get('seed')}"
            )
        if versions:
            lines.append(", ".join(f"{k} {v}" for k, v in versions.items()))
        if execution.get("name"):
            lines.append(f"made on {execution['name']}")
        return lines
