"""The comparison report: FP and several recipes at several bit-widths, side by side (the paper's tables).

    report = run_compare(CompareSpec(model="tiny-llamagen", rows=plan_rows(["fp", "rtn"], ["w8a8"])), out)

Every row samples the same class-balanced labels under the same seeds, so the images of two rows differ
only by quantization. Each row gets:
- fidelity to FP: token agreement under the same seeds, teacher-forced logit KL and top-1 agreement on
  held-out sequences (the test split for bundled models, else the FP model's own samples);
- for bundled (Fashion-MNIST) models, proxy metrics from the project's classifier: proxy-FID against
  the test split and against the FP model's samples, proxy-IS, proxy class accuracy;
- the calibration selection (pct, cond/uncond counts);
- a real-execution row, `vs_simulated`: KL(simulated || real) and top-1 agreement teacher-forced on the
  same parameters, and (where its simulated twin was measured) the sampled token agreement with it,
  which runs cached decoding and so the fused attention kernel where the device has one.
`report.json` holds only numbers that a rerun on the same machine reproduces exactly; wall-clock times
and memory go to `timings.json`. `report.md` shows both, with deltas vs FP and ratios vs rtn.
"""

from __future__ import annotations

import copy
import json
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from quantcore import zoo
from quantcore.api import load_generator
from quantcore.calib import CalibrationSpec, build_calibration_set
from quantcore.errors import ConfigError, RecipeError
from quantcore.eval.evaluate import resolve_reference
from quantcore.eval.fidelity import sampled_fidelity, teacher_forced
from quantcore.eval.inception import InceptionFeatures
from quantcore.eval.proxy import proxy_features, proxy_metrics
from quantcore.eval.quality import VS_FP, VS_REFERENCE, SampleSet, measure
from quantcore.generation import ImageGenerator
from quantcore.images import make_grid, save_png
from quantcore.models import family
from quantcore.pipeline import quantize
from quantcore.quant.real import summarize, to_real
from quantcore.recipe import PRESETS, Recipe, parse_bits
from quantcore.spec import SELECTIONS
from quantcore.zoo.data import load_fashion_mnist, to_rgb32

FP = "fp"
Progress = Callable[[str, float], None]


class RowSpec(BaseModel):
    """One row of the report: a recipe at a bit-width, calibrated on a selection (FP has neither)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    recipe: str
    bits: str | None = None
    selection: str | None = None
    # "real": after calibration, quantcore.quant.real.to_real swaps in the integer/fp8 modules
    execution: Literal["simulated", "real"] = "simulated"

    @model_validator(mode="after")
    def _check(self) -> RowSpec:
        """Fail before any sampling: the recipe must build at these bits, the selection must exist."""
        if self.recipe != FP:
            Recipe.preset(self.recipe, *parse_bits(self.bits or ""))
            if self.selection not in SELECTIONS:
                raise ValueError(f"selection {self.selection!r} is not one of {', '.join(SELECTIONS)}")
        elif self.execution != "simulated":
            raise ValueError("the fp row has no quantized execution; use execution 'simulated'")
        return self

    @property
    def label(self) -> str:
        if self.recipe == FP:
            return FP
        suffix = "-real" if self.execution == "real" else ""
        return f"{self.recipe}-{self.bits}-{self.selection}{suffix}"


class CompareSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    checkpoint: str | None = None
    tokenizer_checkpoint: str | None = None
    rows: list[RowSpec] = Field(min_length=1)
    num_images: int = Field(100, ge=2, le=50_000, description="images per row, class-balanced")
    calib_samples: int = Field(32, ge=2, le=100_000, description="images in the calibration pool")
    seed: int = Field(0, ge=0, description="calibration seed")
    eval_seed: int = Field(10_000, ge=0, description="image i of every row uses seed eval_seed + i")
    batch_size: int = Field(
        50, ge=1, le=4096, description="images per generation chunk (fixed shapes: part of the numbers)"
    )
    calib_batch_size: int = Field(16, ge=1, le=4096)
    heldout: int = Field(256, ge=1, le=10_000, description="sequences for the teacher-forced metrics")
    reference_images: int = Field(
        10_000, ge=2, le=10_000, description="test-split images that proxy-FID (test) compares against"
    )
    grid_images: int = Field(40, ge=1, le=1000)
    noise_floor: bool = Field(
        False, description="also sample FP under other seeds: the proxy-FID-vs-FP of pure sampling noise"
    )
    inception: bool = Field(
        False,
        description="Inception columns too: FID/sFID/precision/recall against the reference and FID/sFID "
        "vs FP, each with a bootstrap 95% interval (quantcore.eval.quality); ~0.1 s per image on a CPU",
    )
    inception_reference: str | None = Field(
        None, description="their reference .npz; bundled models default to the Fashion-MNIST test split"
    )
    bootstrap: int = Field(50, ge=0, le=1000, description="bootstrap replicates of the Inception intervals")


def plan_rows(
    recipes: list[str],
    bits: list[str],
    selections: list[str] = ("dgc-official",),
    executions: list[str] = ("simulated",),
) -> list[RowSpec]:
    """The cross product recipes x bits x selections x executions ('fp' once); errors name the CLI option."""
    if not recipes:
        raise ConfigError("--recipes: give at least one recipe")
    unknown = [r for r in recipes if r != FP and r not in PRESETS]
    if unknown:
        raise ConfigError(f"--recipes: unknown recipe {unknown[0]!r}; choose from {FP}, {', '.join(PRESETS)}")
    bad = [s for s in selections if s not in SELECTIONS]
    if bad or not selections:
        raise ConfigError(
            f"--selection: unknown selection {(bad or [''])[0]!r}; choose from {', '.join(SELECTIONS)}"
        )
    if not executions or any(e not in ("simulated", "real") for e in executions):
        raise ConfigError(f"--execution: {','.join(executions)!r}: choose from simulated, real")
    quantized = [r for r in recipes if r != FP]
    if quantized and not bits:
        raise ConfigError("--bits: give at least one bit-width, like w8a8")
    rows = [RowSpec(recipe=FP)] if FP in recipes else []
    for label in bits:
        try:
            w, a = parse_bits(label)
            for recipe in quantized:
                Recipe.preset(recipe, w, a)
        except RecipeError as exc:
            raise ConfigError(f"--bits: {label!r}: {exc}") from None
        canonical = f"w{w}" + (f"a{a}" if a is not None else "")
        rows += [
            RowSpec(recipe=r, bits=canonical, selection=s, execution=e)
            for r in quantized
            for s in selections
            for e in executions
        ]
    return rows


# ---------------------------------------------------------------------------------------------------
# Measuring one model
# ---------------------------------------------------------------------------------------------------


class PeakRSS:
    """Peak resident memory above the starting point while the block runs, polled from /proc/self/statm
    every `interval` s (torch's CPU tensors bypass tracemalloc, so RSS is what sees them)."""

    PAGE = 4096

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak_mib: float | None = None

    @classmethod
    def _rss(cls) -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * cls.PAGE

    def __enter__(self) -> PeakRSS:
        self._start = self._max = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._max = max(self._max, self._rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._max = max(self._max, self._rss())
        self.peak_mib = (self._max - self._start) / 2**20


def _sample(generator: ImageGenerator, labels, seeds, progress) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (N, L), images (N, H, W, 3)); the generator's fixed chunks make both independent of N."""
    total = generator.progress_total(len(labels))
    tokens = generator.generate_tokens(labels, seeds, progress=lambda n: progress(n / total)).cpu()
    return tokens, generator.decode(tokens)


def _generator(model, like: ImageGenerator, source: str, chunk_size: int) -> ImageGenerator:
    return ImageGenerator(model, like.tokenizer, like.defaults, source, chunk_size=chunk_size)


class _Reference:
    """What every row is measured against: the FP samples, held-out sequences and the test features."""

    def __init__(self, fp: ImageGenerator, spec: CompareSpec, bundled: bool, progress: Progress):
        n, classes = spec.num_images, fp.num_classes
        self.bootstrap = spec.bootstrap
        self.labels = [i % classes for i in range(n)]
        self.seeds = [spec.eval_seed + i for i in range(n)]
        self.tokens, self.images = _sample(fp, self.labels, self.seeds, lambda f: progress("fp", f))
        self.classifier = zoo.load_classifier() if bundled else None
        if bundled:
            self.test_features, _ = proxy_features(self.classifier, _test_images(spec.reference_images))
            self.fp_features, _ = proxy_features(self.classifier, self.images)
            self.heldout_source = "fashion-mnist test split"
            self.heldout = zoo.heldout_sequences(fp.model, fp.tokenizer, spec.heldout)
        else:
            # no data of its own: the FP model's samples stand in (as quantcore.api.fidelity_metrics)
            k = min(spec.heldout, n)
            self.heldout_source = "FP samples"
            self.heldout = (torch.tensor(self.labels[:k]), self.tokens[:k])
        self.features = InceptionFeatures() if spec.inception else None
        if spec.inception:
            self.inception_ref = resolve_reference(
                spec.inception_reference,
                spec.model,
                self.features,
                True,
                spec.reference_images,
                lambda f: progress("inception reference", f),
            )
            self.inception_metrics = list(VS_REFERENCE) if self.inception_ref is not None else []
            if self.inception_ref is not None and self.inception_ref.spatial is None:
                self.inception_metrics.remove("sfid")
            self.fp_set = self.sample_set(self.seeds, self.images)

    def sample_set(self, seeds, images) -> SampleSet:
        return SampleSet(self.labels, seeds, *self.features(images))

    def inception(self, samples: SampleSet, versus_fp: bool, intervals: bool = True) -> dict:
        """Flat Inception metrics of a set (value and `<name>_ci95`); `versus_fp` adds FID/sFID vs FP."""
        metrics = self.inception_metrics + (list(VS_FP) if versus_fp else [])
        fp = self.fp_set if versus_fp else None
        replicates = self.bootstrap if intervals else 0
        result = measure(samples, metrics, self.inception_ref, fp, replicates=replicates)
        out = {}
        for name, entry in result["metrics"].items():
            out[name] = entry["value"]
            if "ci95" in entry:
                out[f"{name}_ci95"] = entry["ci95"]
        return out


def _test_images(count: int) -> torch.Tensor:
    images, _ = load_fashion_mnist("test")
    return torch.from_numpy(to_rgb32(images[:count]))


def _row_metrics(generator: ImageGenerator, fp: ImageGenerator, ref: _Reference, tokens, images) -> dict:
    classes, sequences = ref.heldout
    out = {
        **sampled_fidelity(fp.model.family, ref.tokens, tokens),
        **teacher_forced(fp.model, generator.model, classes, sequences),
    }
    if ref.classifier is not None:
        # FP against its own images would read 0 up to rounding: leave that cell empty
        other = None if generator is fp else ref.fp_features
        proxy = proxy_metrics(ref.classifier, images, np.array(ref.labels), ref.test_features, other)
        out["proxy_fid_test"] = proxy.pop("proxy_fid_test")
        if other is not None:
            out["proxy_fid_vs_fp"] = proxy.pop("proxy_fid_other")
        out.update(proxy)
    if ref.features is not None:
        samples = ref.fp_set if generator is fp else ref.sample_set(ref.seeds, images)
        out.update(ref.inception(samples, versus_fp=generator is not fp))
    return out


def _rounded(metrics: dict) -> dict:
    def rounded(v):
        return round(v, 6) if isinstance(v, float) else [rounded(x) for x in v] if isinstance(v, list) else v

    return {k: rounded(v) for k, v in metrics.items()}


def _selection_info(calibration) -> dict:
    info = calibration.info
    keep = ("selection", "pct", "counts", "distances_allclose")
    return {"pool_size": calibration.pool_size, **{k: info[k] for k in keep if k in info}}


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------


def environment() -> dict:
    """The machine and software (what a rerun has to match for identical numbers)."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    env = {"cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():  # the engine's "auto" device: the GPU the rows ran on
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


class _Calibrations:
    """One calibration set per selection, built on first use and shared by every row (same pool seed)."""

    def __init__(self, fp: ImageGenerator, spec: CompareSpec, progress: Progress, timings: dict):
        self.fp, self.spec, self.progress, self.timings = fp, spec, progress, timings
        self.sets: dict = {}

    def get(self, selection: str):
        if selection not in self.sets:
            spec = CalibrationSpec(
                num_samples=self.spec.calib_samples,
                selection=selection,
                seed=self.spec.seed,
                batch_size=self.spec.calib_batch_size,
            )
            start = time.perf_counter()
            self.sets[selection] = build_calibration_set(
                self.fp.model, spec, self.fp.default_sampling, self.progress
            )
            self.timings[f"calibration_pool_{selection}"] = round(time.perf_counter() - start, 3)
        return self.sets[selection]


@torch.no_grad()  # not torch.set_grad_enabled(False): callers keep their grad mode
def run_compare(spec: CompareSpec, out_dir: str | Path, progress: Progress | None = None) -> dict:
    """Measure every row of `spec`, write report.json, timings.json, report.md and one grid per row."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report_progress = progress or (lambda stage, fraction: None)
    loaded = load_generator(spec.model, spec.checkpoint, spec.tokenizer_checkpoint, real=False)
    fp = _generator(loaded.model, loaded, spec.model, spec.batch_size)
    bundled = spec.model in zoo.BUNDLED and spec.checkpoint is None
    started = time.perf_counter()
    ref = _Reference(fp, spec, bundled, report_progress)
    timings: dict = {"rows": {}, "fp_reference": round(time.perf_counter() - started, 3)}
    calibrations = _Calibrations(fp, spec, report_progress, timings)
    rows, tokens = [], {}  # tokens: each row's samples, for the real rows' agreement with their twins
    for i, row in enumerate(spec.rows):
        stage = f"[{i + 1}/{len(spec.rows)}] {row.label}"
        result, row_timing, tokens[row.label] = _measure_row(
            row, fp, ref, spec, calibrations, out_dir, stage, report_progress
        )
        rows.append(result)
        timings["rows"][row.label] = row_timing
    _sampled_vs_simulated(rows, tokens, fp.model.family)
    report = {
        "model": spec.model,
        "family": fp.model.family,
        "proxy_metrics": bundled,
        "heldout_source": ref.heldout_source,
        "spec": spec.model_dump(mode="json"),
        "sampling": fp.default_sampling,
        "environment": environment(),
        "rows": rows,
    }
    if spec.inception:
        report["inception_reference"] = ref.inception_ref.describe() if ref.inception_ref else None
        report["inception_network"] = ref.features.describe()
    if spec.noise_floor:
        report["fp_noise_floor"] = _noise_floor(fp, ref, spec, report_progress)
    timings["total"] = round(time.perf_counter() - started, 3)
    timings["memory_method"] = "peak RSS above the start of quantize(), /proc/self/statm polled every 2 ms"
    write_json(out_dir / "report.json", report)
    write_json(out_dir / "timings.json", timings)
    (out_dir / "report.md").write_text(render_markdown(report, timings))
    report_progress("done", 1.0)
    return report


def _measure_row(
    row: RowSpec, fp, ref, spec, calibrations, out_dir, stage, progress
) -> tuple[dict, dict, torch.Tensor]:
    """(result, timing, sampled tokens) of one row."""
    timing: dict = {}
    result: dict = {"label": row.label, "recipe": row.recipe, "bits": row.bits, "selection": None}
    result["execution"] = row.execution
    if row.recipe == FP:
        generator, tokens, images = fp, ref.tokens, ref.images
    else:
        calibration = calibrations.get(row.selection)
        w, a = parse_bits(row.bits)
        model = copy.deepcopy(fp.model)
        start = time.perf_counter()
        with PeakRSS() as memory:
            quantize(
                model,
                Recipe.preset(row.recipe, w, a),
                calibration,
                lambda s, f: progress(f"{stage} {s}", f),
                batch_size=spec.calib_batch_size,
            )
        timing["calibration_seconds"] = round(time.perf_counter() - start, 3)
        timing["peak_rss_delta_mib"] = round(memory.peak_mib, 1)
        result["selection"] = _selection_info(calibration)
        if row.execution == "real":
            simulated = copy.deepcopy(model)
            result["execution_paths"] = summarize(to_real(model))  # layers per path
            # what the kernels change, on the same parameters: KL(simulated || real) teacher-forced
            result["vs_simulated"] = _rounded(teacher_forced(simulated, model, *ref.heldout))
            del simulated
        generator = _generator(model, fp, row.label, spec.batch_size)
        start = time.perf_counter()
        tokens, images = _sample(generator, ref.labels, ref.seeds, lambda f: progress(f"{stage} sample", f))
        timing["sampling_seconds"] = round(time.perf_counter() - start, 3)
    result["metrics"] = _rounded(_row_metrics(generator, fp, ref, tokens, images))
    grid = make_grid(images[: spec.grid_images], ncol=min(fp.num_classes, spec.grid_images))
    result["grid"] = save_png(grid, out_dir / f"grid-{row.label}.png").name
    return result, timing, tokens


def _sampled_vs_simulated(rows: list[dict], tokens: dict[str, torch.Tensor], family_name: str) -> None:
    """In place: each real row whose simulated twin (same recipe, bits, selection) was measured gets the
    sampled agreement with it under the same seeds (cached decoding: the attention kernels included)."""
    for row in rows:
        twin = row["label"].removesuffix("-real")
        if row["execution"] == "real" and twin in tokens:
            row["vs_simulated"].update(
                _rounded(sampled_fidelity(family_name, tokens[twin], tokens[row["label"]]))
            )


def _noise_floor(fp: ImageGenerator, ref: _Reference, spec: CompareSpec, progress: Progress) -> dict:
    """FP against itself under other seeds: what proxy-FID-vs-FP and token agreement read for a model
    that samples the same distribution but shares no randomness with FP."""
    seeds = [spec.eval_seed + spec.num_images + i for i in range(spec.num_images)]
    tokens, images = _sample(fp, ref.labels, seeds, lambda f: progress("fp other seeds", f))
    metrics = sampled_fidelity(fp.model.family, ref.tokens, tokens)
    if ref.classifier is not None:
        proxy = proxy_metrics(ref.classifier, images, np.array(ref.labels), None, ref.fp_features)
        metrics["proxy_fid_vs_fp"] = proxy["proxy_fid_other"]
    if ref.features is not None:  # the noise floors of the Inception columns: values only
        metrics.update(ref.inception(ref.sample_set(seeds, images), versus_fp=True, intervals=False))
    return _rounded(metrics)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------
# report.md
# ---------------------------------------------------------------------------------------------------

# (column title, metric key, decimals)
COLUMNS = (
    ("proxy-IS", "proxy_is", 2),
    ("proxy-FID test", "proxy_fid_test", 2),
    ("proxy-FID vs FP", "proxy_fid_vs_fp", 2),
    ("proxy acc.", "proxy_class_accuracy", 3),
    ("token agr.", "token_agreement", 3),
    ("logit KL", "logit_kl", 4),
    ("top-1 agr.", "top1_agreement", 3),
    ("latent err.", "latent_rel_error", 4),  # continuous-token families (MAR)
    ("cond. err.", "condition_rel_error", 4),
    ("diff. loss", "diffusion_loss", 4),
    ("FID", "fid", 2),
    ("sFID", "sfid", 2),
    ("precision", "precision", 3),
    ("recall", "recall", 3),
    ("FID vs FP", "fid_vs_fp", 2),
    ("sFID vs FP", "sfid_vs_fp", 2),
)
# lower-is-better metrics shown as a ratio to rtn at the same bits
RTN_RATIOS = ("proxy_fid_vs_fp", "logit_kl", "fid_vs_fp")


def _rtn_baseline(rows: list[dict], row: dict) -> dict | None:
    """The rtn row at the same bits, with the same selection if there is one."""
    same_bits = [r for r in rows if r["recipe"] == "rtn" and r["bits"] == row["bits"]]
    same_sel = [r for r in same_bits if r["selection"]["selection"] == row["selection"]["selection"]]
    return (same_sel or same_bits or [None])[0]


def _cell(row: dict, fp: dict | None, rtn: dict | None, key: str, decimals: int) -> str:
    value = row["metrics"].get(key)
    if value is None:
        return "–"
    text = f"{value:.{decimals}f}"
    interval = row["metrics"].get(f"{key}_ci95")
    if interval is not None:
        text += f" [{interval[0]:.{decimals}f}, {interval[1]:.{decimals}f}]"
    base = fp["metrics"].get(key) if fp is not None and row is not fp else None
    if base is not None and not key.endswith("_vs_fp"):  # FP's own FID-vs-FP is 0: the value is the delta
        text += f" ({value - base:+.{decimals}f})"
    if rtn is not None and row is not rtn and key in RTN_RATIOS and rtn["metrics"].get(key):
        text += f" ×{value / rtn['metrics'][key]:.2f}"
    return text


def _method_cell(row: dict) -> str:
    """The recipe; real-execution rows say which kernels ran."""
    if row.get("execution") != "real":
        return row["recipe"]
    paths = ", ".join(f"{n} {p}" for p, n in sorted(row.get("execution_paths", {}).items()))
    return f"{row['recipe']}, real ({paths})"


def _selection_cell(row: dict) -> str:
    sel = row["selection"]
    if sel is None:
        return "–"
    pct = f" pct {sel['pct']:.2f}" if "pct" in sel else ""
    c = sel["counts"]
    return f"{sel['selection']}{pct} ({c['cond']}c/{c['uncond']}u)"


def _teacher_forced_measures(family_name: str) -> str:
    if family(family_name).continuous_tokens:
        return (
            "condition error (relative L2 of what the diffusion head reads) and diffusion loss (eps MSE, "
            "the same seeded masks, steps and noise for every row); latent err.: relative L2 of the sampled latents"
        )
    return "logit KL (nats/token, KL(FP || quantized)) and top-1 agreement"


def render_markdown(report: dict, timings: dict, findings: str | None = None) -> str:
    """The report as a Markdown table like the paper's, plus timings and optional findings text."""
    spec, env = report["spec"], report["environment"]
    rows = report["rows"]
    fp = next((r for r in rows if r["recipe"] == FP), None)
    columns = [c for c in COLUMNS if any(c[1] in r["metrics"] for r in rows)]
    lines = [
        f"# Compare report: {report['model']} ({report['family']})",
        "",
        f"- {spec['num_images']} images per row (class-balanced, seeds {spec['eval_seed']}.."
        f"{spec['eval_seed'] + spec['num_images'] - 1}, the same in every row); sampling {report['sampling']}.",
        f"- Calibration: pool of {spec['calib_samples']} FP images (2x with the uncond half), seed {spec['seed']}.",
        f"- proxy-FID test: against the first {spec['reference_images']} test-split images.\n"
        f"- Teacher-forced {_teacher_forced_measures(report['family'])} on {spec['heldout']} "
        f"sequences from the {report['heldout_source']}.",
        f"- Machine: {env['cpu']}, torch {env['torch']}, {env['threads']} thread(s).",
    ]
    if report["proxy_metrics"]:
        lines.append(
            f"- proxy-* metrics use the project's Fashion-MNIST classifier, not Inception: compare them only "
            f"with each other at the same image count ({spec['num_images']} images)."
        )
    if spec.get("inception"):
        ref = report["inception_reference"]
        against = f"against {ref['name']} ({ref['num_images']} images), " if ref else ""
        lines.append(
            f"- FID, sFID, precision, recall (k=3): the ADM protocol on the FID Inception network, {against}"
            f"FID/sFID vs FP against the FP row's images; `[a, b]`: bootstrap 95% interval "
            f"({spec['bootstrap']} replicates). No Inception Score (the network file has no logits)."
        )
    lines += [
        "- In parentheses: the difference to FP; `×` the ratio to rtn at the same bits (lower is better).",
        "",
        "| bits | method | calibration set | "
        + " | ".join(c[0] for c in columns)
        + " | calib. s | peak MiB |",
        "| " + " | ".join(["---"] * (len(columns) + 5)) + " |",
    ]
    for row in rows:
        rtn = _rtn_baseline(rows, row) if row["recipe"] != FP else None
        t = timings["rows"].get(row["label"], {})
        cells = [_cell(row, fp, rtn, key, decimals) for _, key, decimals in columns]
        lines.append(
            f"| {row['bits'] or 'FP'} | {_method_cell(row)} | {_selection_cell(row)} | "
            + " | ".join(cells)
            + f" | {t.get('calibration_seconds', '–')} | {t.get('peak_rss_delta_mib', '–')} |"
        )
    real = [r for r in rows if "vs_simulated" in r]
    if real:
        lines += ["", "Real kernels against the simulated model with the same parameters (teacher-forced on the "
                  "held-out sequences; sampled under the same seeds where the simulated row was measured too):", ""]  # fmt: skip
        lines += [
            f"- {r['label']}: " + ", ".join(f"{k} {v:.3g}" for k, v in r["vs_simulated"].items())
            for r in real
        ]
    if "fp_noise_floor" in report:
        floor = report["fp_noise_floor"]
        lines += [
            "",
            "FP against itself under other seeds (the value of pure sampling noise): "
            + ", ".join(f"{k} {v:.3f}" for k, v in floor.items())
            + ".",
        ]
    lines += [
        "",
        f"Timings are wall-clock on the machine above (not in report.json): total {timings['total']} s; "
        f"calib. s = quantize() only; peak MiB = {timings['memory_method']}.",
        "",
        "Grids (same seeds in every row; columns are classes): "
        + ", ".join(f"[{r['label']}]({r['grid']})" for r in rows),
    ]
    if findings:
        lines += ["", findings.strip()]
    return "\n".join(lines) + "\n"
