"""The measured effect of each way the official calibration differs from ours: ptq4arvg at one
bit-width on a bundled model, in the official mode with one option flipped at a time, and in the
staged mode; teacher-forced logit KL vs FP (nats/token) and top-1 agreement on held-out test-split
sequences, every variant calibrated on the same DGC selection.

    .venv/bin/python bench/quality/calibration_options.py --model tiny-var --out bench/quality/tiny-var

Writes OUT/calibration-options-<bits>.json. Only the options that change something for the family run.
"""

import argparse
import copy
import json
from pathlib import Path

from probe import calibration, heldout

from quantcore.compare import environment
from quantcore.eval.fidelity import teacher_forced_fidelity
from quantcore.pipeline import layout_of, quantize
from quantcore.recipe import Calibration, Recipe, parse_bits


def variants(family_official) -> dict[str, dict]:
    """Name -> calibration fields: the official mode, each of its family's settings flipped, staged."""
    out = {"official": {}}
    out["official, sink-aware heads"] = {"sink_aware_heads": True}
    if family_official.batch_size is not None and family_official.ema is not None:
        out["official, no EMA (whole-set ranges per batch)"] = {"ema": False}
    if not family_official.causal_mask:
        out["official, causal mask"] = {"causal_mask": True}
    if family_official.include_zero:
        out["official, no include-zero"] = {"include_zero": False}
    if not family_official.recalibrate_all:
        out["official, recalibrate all at the end"] = {"recalibrate_all": True}
    if family_official.head_second_shift:
        out["official, one head shift"] = {"head_second_shift": False}
    out["staged"] = {"mode": "staged"}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-var")
    parser.add_argument("--bits", default="w6a6")
    parser.add_argument("--heldout", type=int, default=256)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    fp, classes, tokens = heldout(args.heldout, args.model)
    calib = calibration(fp, args.calib_samples)
    w, a = parse_bits(args.bits)
    base = Recipe.preset("ptq4arvg", w, a)
    result = {}
    for name, fields in variants(layout_of(fp.model).official).items():
        recipe = base.model_copy(update={"calibration": Calibration(**fields)})
        model = copy.deepcopy(fp.model)
        quantize(model, recipe, calib, batch_size=64)
        metrics = teacher_forced_fidelity(fp.model, model, classes, tokens)
        result[name] = {"calibration": fields, **{k: round(v, 5) for k, v in metrics.items()}}
        print(args.model, args.bits, name, result[name], flush=True)
    if args.out:
        report = {"model": args.model, "bits": args.bits, "environment": environment(), "variants": result}
        (args.out / f"calibration-options-{args.bits}.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
