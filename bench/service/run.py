"""Job speed: one quantization job end to end (load, calibration pool, passes, evaluation, artifact write)
through the engine entry point the worker calls (`quantcore.api.quantize_job`), per model.

    python bench/service/run.py --models llamagen-xl,var-d16,rar-b --out bench/service

Random weights (no checkpoints on the benchmark machines), the `ptq4arvg` recipe at W8A8, 128
calibration images, 8 evaluation images: the job of the GPU-service issue. Writes results-<machine>.json
and .md with the seconds of each stage as the manifest records them.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from quantcore.api import describe_device, quantize_job
from quantcore.registry import RandomWeightsWarning

TARGETS_S = {"llamagen-xl": 90, "var-d16": 30, "rar-b": 45}


def run_one(model: str, device: str, calib: int, eval_images: int, batch: int) -> dict:
    spec = {
        "model": model,
        "recipe": "ptq4arvg",
        "w_bits": 8,
        "a_bits": 8,
        "calibration": {"num_samples": calib, "batch_size": batch},
        "evaluation": {"num_images": eval_images},
    }
    last = {"t": time.perf_counter(), "gap": 0.0}

    def progress(stage, fraction, overall):  # the longest silence between two reports
        now = time.perf_counter()
        last["gap"], last["t"] = max(last["gap"], now - last["t"]), now

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        manifest = quantize_job(spec, Path(tmp) / "artifact", progress, device=device)
        seconds = time.perf_counter() - start
        size = sum(f.stat().st_size for f in (Path(tmp) / "artifact").iterdir())
    return {
        "model": model,
        "spec": spec,
        "seconds": round(seconds, 2),
        "target_s": TARGETS_S.get(model),
        "stages": manifest["timings"],
        "write_s": round(seconds - manifest["timings"]["until_write"], 2),
        "longest_progress_gap_s": round(last["gap"], 2),
        "metrics": {k: v for k, v in manifest["metrics"].items() if isinstance(v, int | float)},
        "artifact_bytes": size,
    }


def write_reports(rows: list[dict], device: dict, out: Path, command: str) -> None:
    machine = device["name"].lower().replace(" ", "-")
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": device, "python": platform.python_version(), "command": command, "jobs": rows}
    (out / f"results-{machine}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Job speed on {device['name']} ({device['device']}, torch {device['torch']})",
        "",
        f"Command: `{command}`",
        "",
        "One job end to end (random weights, `ptq4arvg` W8A8), seconds per stage as the manifest records them.",
        "",
        "| model | total s | target s | load | calibration pool | passes | evaluate | write | longest silence s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error'][:120]} | | | | | | | |")
            continue
        s = r["stages"]
        lines.append(
            f"| {r['model']} | {r['seconds']} | {r['target_s'] or '-'} | {s.get('load', 0)} | "
            f"{s.get('calibration-pool', 0)} | {s.get('quantize', 0)} | {s.get('evaluate', 0)} | "
            f"{r['write_s']} | {r['longest_progress_gap_s']} |"
        )
    (out / f"results-{machine}.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llamagen-xl,var-d16,rar-b")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--eval-images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    warnings.simplefilter("ignore", RandomWeightsWarning)
    torch.backends.cuda.matmul.allow_tf32 = True
    device = describe_device(args.device)
    rows = []
    for model in args.models.split(","):
        try:
            rows.append(run_one(model, args.device, args.calib_samples, args.eval_images, args.batch_size))
        except Exception as e:  # a failed model is a result too: the others still run
            rows.append({"model": model, "error": f"{type(e).__name__}: {e}"[:500]})
        print(json.dumps(rows[-1]), flush=True)
        write_reports(rows, device, args.out, "python " + " ".join(sys.argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
