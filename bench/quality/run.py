"""The committed quality comparison of a bundled model (default tiny-llamagen), on CPU.

    .venv/bin/python bench/quality/run.py                      # ~25 min on 2 busy cores
    .venv/bin/python bench/quality/run.py --render-only        # re-write report.md with FINDINGS.md

Rows: FP; rtn, smoothquant, os+, ptq4arvg and its ablations (gps, stwq, sq+stwq, dtwq) at W8A8, W6A6
and W4A8, calibrated on the official DGC selection; ptq4arvg at W6A6 also on dgc-mahalanobis, random
and uniform selections (the same pool). Writes bench/quality/<model>/report.{json,md}, timings.json
and one grid per row; `FINDINGS.md` in that folder, if present, is appended to report.md. The committed
grids are 256-colour PNGs (half the bytes; the tree's 50 MiB budget): every metric comes from the full
images, the grids are only for looking at.
"""

import argparse
import json
from pathlib import Path

import torch

from quantcore.compare import CompareSpec, RowSpec, plan_rows, render_markdown, run_compare
from quantcore.images import compact_png

RECIPES = ["fp", "rtn", "smoothquant", "os+", "ptq4arvg", "gps", "stwq", "sq+stwq", "dtwq"]
BITS = ["w8a8", "w6a6", "w4a8"]
SELECTION_BITS = "w6a6"
OTHER_SELECTIONS = ["dgc-mahalanobis", "random", "uniform"]


def rows(recipes: list[str], bits: list[str], selections: bool = True) -> list[RowSpec]:
    planned = plan_rows(recipes, bits)
    if not selections or "ptq4arvg" not in recipes or SELECTION_BITS not in bits:
        return planned
    return planned + [RowSpec(recipe="ptq4arvg", bits=SELECTION_BITS, selection=s) for s in OTHER_SELECTIONS]


def log_finished_stages(stage: str, fraction: float) -> None:
    if fraction >= 1:  # one line per finished stage keeps the log readable
        print(stage, flush=True)


def render(out: Path) -> None:
    for grid in sorted(out.glob("grid-*.png")):
        compact_png(grid)
    report = json.loads((out / "report.json").read_text())
    timings = json.loads((out / "timings.json").read_text())
    findings = out / "FINDINGS.md"
    text = findings.read_text() if findings.exists() else None
    (out / "report.md").write_text(render_markdown(report, timings, text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llamagen")
    parser.add_argument("--num-images", type=int, default=300)
    parser.add_argument("--calib-samples", type=int, default=128, help="official: 128 (pool of 256)")
    parser.add_argument(
        "--seed", type=int, default=0, help="calibration seed (another one: the spread of a row)"
    )
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--bits", default=",".join(BITS))
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared 2-core CPU")
    parser.add_argument("--inception", action="store_true", help="the Inception columns too")
    parser.add_argument(
        "--reference-images", type=int, default=10_000, help="test-split images compared against"
    )
    parser.add_argument(
        "--selections",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ptq4arvg at W6A6 on the other calibration selections",
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    out = args.out or Path(__file__).resolve().parent / args.model
    if not args.render_only:
        torch.set_num_threads(args.threads)
        spec = CompareSpec(
            model=args.model,
            rows=rows(args.recipes.split(","), args.bits.split(","), args.selections),
            num_images=args.num_images,
            calib_samples=args.calib_samples,
            seed=args.seed,
            calib_batch_size=64,
            batch_size=100,
            heldout=512,
            noise_floor=True,
            reference_images=args.reference_images,
            inception=args.inception,
        )
        run_compare(spec, out, log_finished_stages)
    render(out)
    print((out / "report.md").read_text())


if __name__ == "__main__":
    main()
