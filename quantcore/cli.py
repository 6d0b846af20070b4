"""`ptq4arvg` command line of the engine: models, generate, quantize, compare, eval, reference, export
(`python -m quantcore`).

The installed `ptq4arvg` script (app.entry) adds the service's commands: serve, worker, admin.

Errors are one line on stderr and a non-zero exit; `--json` prints machine-readable results on stdout
while progress bars go to stderr.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path

from quantcore.errors import ConfigError, QuantcoreError

# job-spec fields of `quantize` -> the flag that sets them, so a spec error names the flag
QUANTIZE_FLAGS = {
    "model": "MODEL",
    "checkpoint": "--checkpoint",
    "tokenizer_checkpoint": "--tokenizer-checkpoint",
    "recipe": "--recipe",
    "w_bits": "--w-bits",
    "a_bits": "--a-bits",
    "calibration.num_samples": "--calib-samples",
    "calibration.selection": "--selection",
    "calibration.seed": "--seed",
    "calibration.batch_size": "--batch-size",
    "evaluation.num_images": "--eval-images",
    "evaluation.metrics": "--eval-metrics",
    "evaluation.reference": "--eval-ref",
}


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end in one line naming the argument (argparse prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _flag_message(exc: QuantcoreError, flags: dict[str, str]) -> str:
    """The engine's message naming the flag: a leading field name ("w_bits: ...", "top_p must ...")
    becomes the flag, else the flag of the error's `field` (ConfigError) goes first."""
    message = str(exc)
    match = re.match(r"[A-Za-z_][\w.]*", message)
    if match is not None:
        field = ".".join(part for part in match.group().split(".") if not part.isdigit())  # list positions
        if field in flags:
            return flags[field] + message[match.end() :]
    names = [str(part) for part in getattr(exc, "field", None) or () if not isinstance(part, int)]
    for name in (".".join(names), names[-1] if names else ""):
        if name in flags:
            return f"{flags[name]}: {message}"
    return message


def check_writable(path: Path, folder: bool, empty: bool = False, flag: str = "--out") -> None:
    """Fail before any work when `flag`'s path cannot be written: a folder must be a folder (and new or
    empty when `empty`), a file must not be a folder, and the nearest existing parent must take a new
    entry (tried, not guessed: permissions say little to root)."""
    import tempfile

    if empty and path.is_dir() and any(path.iterdir()):
        raise ConfigError(f"{flag} {path}: the folder is not empty; choose a new folder")
    if folder and path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path}: a file is there; give a folder to create")
    if not folder and path.is_dir():
        raise ConfigError(f"{flag} {path}: is a folder; give a file name")
    parent = path.parent if not path.is_dir() else path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: {parent} is not a folder")
    try:
        tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot write under {parent} ({exc.strerror})") from None


def _recipe_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, disable=not enabled, leave=False)


class _StageBar:
    """A percentage bar whose description is the current stage, drawn from the first report on, so an
    error raised before any work prints its one line alone. Call it as the progress callback."""

    def __init__(self, enabled: bool, width: int = 22):
        self.enabled, self.width = enabled, width
        self.bar = None

    def __call__(self, stage: str, fraction: float, overall: float | None = None) -> None:
        """`overall`: how far the whole run is, when the stage's own fraction is not that (jobs)."""
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            w = self.width
            self.bar = tqdm(
                total=100, file=sys.stderr, bar_format=f"{{desc:<{w}.{w}}}{{percentage:3.0f}}%|{{bar}}|"
            )
        self.bar.set_description_str(stage if overall is None else f"{stage} {100 * fraction:.0f}%")
        self.bar.n = round(100 * (fraction if overall is None else overall))
        self.bar.refresh()

    def __enter__(self) -> _StageBar:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_models(args: argparse.Namespace) -> int:
    from quantcore.registry import list_models

    models = list_models()
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    print(
        f"{'name':<16} {'family':<9} {'variant':<7} {'params':>8} {'tokens':>6}  {'cfg':>5}  "
        f"{'weights':<8} official checkpoint"
    )
    for m in models:
        params = f"{m['parameters'] / 1e6:.1f}M"
        ckpt = ", ".join(m["official_checkpoints"]) or "-"
        print(
            f"{m['name']:<16} {m['family']:<9} {m['variant']:<7} {params:>8} {m['tokens']:>6}  "
            f"{m['sampling']['cfg_scale']:>5}  {m['weights']:<8} {ckpt}"
        )
    print(
        "weights: trained = bundled with the package (Fashion-MNIST); random = random unless you pass "
        "--checkpoint (images are noise)"
    )
    for names in {tuple(m["class_names"]) for m in models if m["class_names"]}:
        owners = ", ".join(m["name"] for m in models if tuple(m["class_names"] or ()) == names)
        print(f"classes of {owners}: " + ", ".join(f"{i} {n}" for i, n in enumerate(names)))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from quantcore.api import load_generator
    from quantcore.artifact import read_manifest
    from quantcore.fastgen import check_classes, sampling_settings
    from quantcore.images import make_grid, save_png
    from quantcore.registry import get_spec

    sampling = {
        "cfg_scale": args.cfg_scale,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
    }
    # the model's settings under the flags, checked before anything loads
    spec = get_spec(read_manifest(args.model)["model"]["name"] if Path(args.model).is_dir() else args.model)
    sampling_settings(spec.family, spec.entry.sampling.to_dict() | _given(sampling))
    check_classes(args.classes, spec.config.num_classes)
    check_writable(args.out, folder=False)
    generator = load_generator(
        args.model,
        args.checkpoint,
        args.tokenizer_checkpoint,
        args.device,
        real=not args.simulate,
        objective=args.objective,
    )
    seeds = args.seeds or [args.seed + i for i in range(len(args.classes))]
    total = generator.progress_total(len(args.classes))
    with _progress_bar(total, f"generate {args.model}", not args.no_progress) as bar:
        tokens = generator.generate_tokens(
            args.classes, seeds, progress=lambda n: bar.update(n - bar.n), **sampling
        )
    images = generator.decode(tokens)
    out = save_png(make_grid(images), args.out)
    result = {"out": str(out), "classes": args.classes, "seeds": seeds, "size": list(images.shape[1:3])}
    if generator.execution:
        result["execution"] = generator.execution
    if args.json:
        print(json.dumps(result))
    else:
        print(f"wrote {out} ({len(seeds)} images, {images.shape[1]}x{images.shape[2]})")
    return 0


def _given(values: dict) -> dict:
    """The flags the user set: the others take JobSpec's defaults (one place for them)."""
    return {k: v for k, v in values.items() if v is not None}


def cmd_quantize(args: argparse.Namespace) -> int:
    from quantcore.api import JobSpec, quantize_job
    from quantcore.recipe import Recipe

    recipe = args.recipe
    if args.recipe_file:
        try:
            recipe = Recipe.parse(args.recipe_file.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--recipe-file {args.recipe_file}: cannot read it ({exc})") from None
        except QuantcoreError as exc:
            raise ConfigError(f"--recipe-file {args.recipe_file}: {exc}") from None
    a_bits = None if args.a_bits == 0 else args.a_bits
    spec = {
        "model": args.model,
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "tokenizer_checkpoint": str(args.tokenizer_checkpoint) if args.tokenizer_checkpoint else None,
        "recipe": recipe,
        "w_bits": args.w_bits,
        "a_bits": a_bits,
        "calibration": _given(
            {
                "num_samples": args.calib_samples,
                "selection": args.selection,
                "seed": args.seed,
                "batch_size": args.batch_size,
            }
        ),
        "evaluation": _given(
            {
                "num_images": args.eval_images,
                "metrics": _names(args.eval_metrics) or None,
                "reference": args.eval_ref,
            }
        ),
    }
    job = JobSpec.parse(spec)  # before the progress bar, so a bad spec prints one line only
    check_writable(args.out, folder=True, empty=True)
    with _StageBar(not args.no_progress) as progress:
        manifest = quantize_job(job, args.out, progress, device=args.device)
    summary = {"out": str(args.out), "recipe": manifest["recipe"], "metrics": manifest["metrics"]}
    if args.json:
        print(json.dumps(summary))
    else:
        m = manifest["metrics"]
        fidelity = (
            f"token agreement {m['token_agreement']:.3f}, logit KL {m['logit_kl']:.4g}"
            if "token_agreement" in m
            else "no fidelity metrics (--eval-images 0)"
        )
        print(
            f"wrote {args.out}: {manifest['recipe']['name']} {job.resolved_recipe().bits_label}, "
            f"{fidelity}, calibration {m['calibration_seconds']:.1f}s"
        )
    return 0


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def cmd_compare(args: argparse.Namespace) -> int:
    import torch
    from pydantic import ValidationError

    from quantcore.compare import CompareSpec, plan_rows, run_compare

    rows = plan_rows(_names(args.recipes), _names(args.bits), _names(args.selection), _names(args.execution))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        spec = CompareSpec(
            model=args.model,
            checkpoint=str(args.checkpoint) if args.checkpoint else None,
            tokenizer_checkpoint=str(args.tokenizer_checkpoint) if args.tokenizer_checkpoint else None,
            rows=rows,
            num_images=args.num_images,
            calib_samples=args.calib_samples,
            seed=args.seed,
            batch_size=args.batch_size,
            heldout=args.heldout,
            reference_images=args.reference_images,
            noise_floor=args.noise_floor,
            inception=args.inception,
            inception_reference=args.inception_ref,
            bootstrap=args.bootstrap,
        )
    except ValidationError as exc:  # pydantic's error -> one line naming the option
        first = exc.errors()[0]
        option = "--" + "-".join(str(p) for p in first["loc"]).replace("_", "-")
        raise ConfigError(f"{option}: {first['msg'].removeprefix('Value error, ')}") from None
    check_writable(args.out, folder=True)
    with _StageBar(not args.no_progress, width=48) as progress:
        report = run_compare(spec, args.out, progress)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"wrote {args.out}/report.md, report.json, timings.json and {len(report['rows'])} grids")
    return 0


def _interval_text(entry: dict, decimals: int) -> str:
    lo, hi = entry.get("ci95", (None, None))
    return f"[{lo:.{decimals}f}, {hi:.{decimals}f}]" if lo is not None else "-"


def _quality_table(result: dict) -> str:
    """The eval result for people: one row per metric, with its interval, FP value and noise floor."""
    ref = result["reference"]
    against = f" against {ref['name']} ({ref['num_images']} images)" if ref else ""
    lines = [
        f"{result['source']}: {result['num_images']} images{against}, Inception {result['inception']['weights']}",
        f"{'metric':<12} {'value':>9} {'95% interval':>21} {'FP, same seeds':>15} {'noise floor':>12}",
    ]
    for name, entry in result["metrics"].items():
        decimals = 3 if name in ("precision", "recall") else 2
        fp = f"{entry['fp']:.{decimals}f}" if "fp" in entry else "-"
        floor = f"{entry['noise_floor']:.{decimals}f}" if "noise_floor" in entry else "-"
        lines.append(
            f"{name:<12} {entry['value']:>9.{decimals}f} {_interval_text(entry, decimals):>21} {fp:>15} {floor:>12}"
        )
    lines.append(
        "noise floor: the FP model under other seeds; IS "
        + result["inception_score"].removeprefix("not offered: ")
    )
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    from quantcore.eval.evaluate import evaluate

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.out:
        check_writable(args.out, folder=False)
    with _StageBar(not args.no_progress) as progress:
        result = evaluate(
            args.model,
            args.num_images,
            reference=args.ref,
            metrics=_names(args.metrics) if args.metrics else None,
            checkpoint=args.checkpoint,
            tokenizer_checkpoint=args.tokenizer_checkpoint,
            seed=args.seed,
            batch_size=args.batch_size,
            replicates=args.bootstrap,
            noise_floor=not args.no_noise_floor,
            reference_images=args.ref_images,
            real=not args.simulate,
            device=args.device,
            progress=progress,
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if args.json else _quality_table(result))
    return 0


def cmd_reference(args: argparse.Namespace) -> int:
    from quantcore.eval.inception import InceptionFeatures
    from quantcore.eval.reference import build_reference

    check_writable(args.out, folder=False)
    with _StageBar(not args.no_progress) as progress:
        ref = build_reference(
            args.source, args.out, InceptionFeatures(args.device), lambda f: progress("reference", f)
        )
    summary = {"out": str(args.out), **ref.describe()}
    print(json.dumps(summary) if args.json else f"wrote {args.out}: {ref.num_images} images of {ref.name}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from quantcore.artifact import read_manifest
    from quantcore.export import export

    read_manifest(args.artifact)  # not an artifact: say so before anything else
    check_writable(args.out, folder=True, empty=True)
    summary = export(args.artifact, args.out, args.format)
    if args.json:
        print(json.dumps(summary))
    else:
        groups = ", ".join(f"{g} ({n} layers)" for g, n in summary["config_groups"].items())
        kv = "; KV cache scheme" if summary["kv_cache_scheme"] else ""
        print(f"wrote {args.out}: {summary['format']} ({summary['compression_format']}), {groups}{kv}")
    return 0


def build_parser(extend=None) -> argparse.ArgumentParser:
    """The engine's commands; `extend(subparsers)` lets the service add its own (serve, worker)."""
    parser = _Parser(prog="ptq4arvg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    if extend is not None:
        extend(sub)

    p = sub.add_parser("models", help="list the model registry")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("generate", help="generate a PNG grid of class-conditional images")
    p.add_argument("model", help="registered model name (see `ptq4arvg models`) or an artifact folder")
    p.add_argument("--checkpoint", type=Path, help="model weights (.pt/.pth/.bin or .safetensors)")
    p.add_argument("--tokenizer-checkpoint", type=Path, help="tokenizer weights (e.g. vq_ds16_c2i.pt)")
    p.add_argument("--classes", type=_int_list, required=True, help="comma-separated class labels")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--seeds", type=_int_list, help="one seed per image (overrides --seed)")
    p.add_argument("--cfg-scale", type=float)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--device", default="auto", help="auto (first CUDA device, else CPU), cpu, cuda, cuda:N")
    p.add_argument(
        "--simulate", action="store_true", help="keep quantized layers simulated (no int8/fp8 kernels)"
    )
    p.add_argument(
        "--objective",
        choices=("speed", "memory"),  # to_real's OBJECTIVES, spelled out: the parser imports no torch
        help="artifacts: per layer the fastest kernel, timed (speed, CUDA only), or the smallest (memory)",
    )
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("quantize", help="calibrate and quantize a model into an artifact folder")
    p.add_argument("model", help="registered model name")
    p.add_argument(
        "--recipe",
        default="ptq4arvg",
        help="preset: rtn, smoothquant, os+, gps, stwq, sq+stwq, ptq4arvg, dtwq",
    )
    p.add_argument(
        "--recipe-file", type=_recipe_file, help="a recipe as JSON/YAML (overrides --recipe and the bits)"
    )
    p.add_argument("--w-bits", type=int, default=8, choices=range(2, 9), metavar="{2..8}")
    p.add_argument(
        "--a-bits",
        type=int,
        default=8,
        choices=[0, *range(2, 9)],
        metavar="{0,2..8}",
        help="activation bits; 0 = weight-only",
    )
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--tokenizer-checkpoint", type=Path)
    p.add_argument("--calib-samples", type=int, help="images generated for the calibration pool (default 64)")
    p.add_argument("--selection", help="dgc-official (default), dgc-mahalanobis, random, uniform")
    p.add_argument("--seed", type=int, help="calibration seed (default 0)")
    p.add_argument("--batch-size", type=int, help="images per batch (default 16)")
    p.add_argument("--eval-images", type=int, help="images for the fidelity metrics (0 = none; default 16)")
    p.add_argument(
        "--eval-metrics",
        default="",
        help="Inception metrics too: fid,sfid,precision,recall,fid_vs_fp,sfid_vs_fp",
    )
    p.add_argument("--eval-ref", help="their reference .npz (bundled models: Fashion-MNIST test split)")
    p.add_argument("--device", default="auto", help="auto (first CUDA device, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--out", type=Path, required=True, help="artifact folder to create")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_quantize, spec_flags=QUANTIZE_FLAGS)

    p = sub.add_parser(
        "compare", help="FP and recipes x bit-widths side by side: report.json/.md and image grids"
    )
    p.add_argument("model", help="registered model name; bundled ones also get proxy metrics")
    p.add_argument(
        "--recipes", default="fp,rtn,smoothquant,ptq4arvg", help="fp and/or presets, comma-separated"
    )
    p.add_argument("--bits", default="w8a8,w6a6", help="comma-separated, like w8a8,w6a6,w4a8")
    p.add_argument(
        "--selection",
        default="dgc-official",
        help="calibration selections: dgc-official, dgc-mahalanobis, random, uniform",
    )
    p.add_argument(
        "--execution",
        default="simulated",
        help="simulated and/or real (integer/fp8 kernels from the same parameters), comma-separated",
    )
    p.add_argument("--num-images", type=int, default=100, help="images per row (class-balanced)")
    p.add_argument("--calib-samples", type=int, default=32, help="images generated for the calibration pool")
    p.add_argument("--seed", type=int, default=0, help="calibration seed")
    p.add_argument("--batch-size", type=int, default=50, help="images per generation batch")
    p.add_argument("--heldout", type=int, default=256, help="held-out sequences for logit KL / top-1")
    p.add_argument(
        "--reference-images", type=int, default=10_000, help="test-split images for proxy-FID (test)"
    )
    p.add_argument("--noise-floor", action="store_true", help="also sample FP under other seeds")
    p.add_argument(
        "--inception",
        action="store_true",
        help="Inception FID/sFID/precision/recall and FID vs FP columns, with bootstrap intervals",
    )
    p.add_argument("--inception-ref", help="their reference .npz (bundled models: Fashion-MNIST test split)")
    p.add_argument(
        "--bootstrap", type=int, default=50, help="bootstrap replicates of the Inception intervals"
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--tokenizer-checkpoint", type=Path)
    p.add_argument("--out", type=Path, required=True, help="folder for the report and grids")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "eval", help="FID, sFID, precision/recall (Inception) of a model or artifact, with intervals"
    )
    p.add_argument("model", help="registered model name or an artifact folder")
    p.add_argument(
        "--ref",
        help="reference: an ADM .npz (mu/sigma, arr_0) or one from `ptq4arvg reference`; "
        "bundled models default to the Fashion-MNIST test split",
    )
    p.add_argument(
        "--ref-images", type=int, default=10_000, help="test-split images of the default reference"
    )
    p.add_argument("--num-images", type=int, required=True, help="images to generate (class-balanced)")
    p.add_argument(
        "--metrics",
        help="comma-separated subset of fid,sfid,precision,recall,fid_vs_fp,sfid_vs_fp (default: all that apply)",
    )
    p.add_argument(
        "--seed", type=int, default=10_000, help="image i uses seed + i; the noise floor the next N"
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per generation chunk")
    p.add_argument(
        "--bootstrap", type=int, default=50, help="bootstrap replicates of the intervals (0 = none)"
    )
    p.add_argument("--no-noise-floor", action="store_true", help="skip the FP model under other seeds")
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--tokenizer-checkpoint", type=Path)
    p.add_argument("--simulate", action="store_true", help="artifacts: keep quantized layers simulated")
    p.add_argument("--device", default="auto", help="auto (first CUDA device, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", type=Path, help="also write the result as JSON to this file")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval, spec_flags={"evaluation.reference": "--ref"})

    p = sub.add_parser("reference", help="build an ADM-format reference .npz from a folder or .npz of images")
    p.add_argument(
        "source", type=Path, help="a folder of images (same size) or an .npz with arr_0 (N, H, W, 3)"
    )
    p.add_argument("--out", type=Path, required=True, help="the .npz to write")
    p.add_argument("--device", default="auto", help="auto (first CUDA device, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_reference)

    from quantcore.export import FORMATS

    p = sub.add_parser(
        "export",
        help="write an artifact in a format other tools read (compressed-tensors: config.json + safetensors)",
        description="Refused, naming the layers, when the artifact holds quantizers the format cannot "
        "express exactly (STWQ's per-position-group tables, quantized attention queries/probabilities).",
    )
    p.add_argument("artifact", type=Path, help="an artifact folder (from `ptq4arvg quantize` or the API)")
    p.add_argument("--format", choices=FORMATS, default=FORMATS[0])
    p.add_argument("--out", type=Path, required=True, help="folder to create")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)
    for command in sub.choices.values():
        command.set_defaults(flags=_flags(command))
    return parser


def _flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's destination -> its flag (`top_p` -> `--top-p`), to name flags in engine errors."""
    return {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings}


def main(argv: list[str] | None = None, extend=None) -> int:
    args = build_parser(extend).parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda msg, cat, *a, **k: print(f"warning: {msg}", file=sys.stderr)
        try:
            return args.func(args)
        except QuantcoreError as exc:
            flags = args.flags | getattr(args, "spec_flags", {})
            print(f"error: {_flag_message(exc, flags)}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
