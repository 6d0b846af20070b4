"""Recipe variants the presets do not cover, on tiny-llamagen: teacher-forced logit KL vs FP.

    .venv/bin/python bench/quality/variants.py --out bench/quality/tiny-llamagen/variants.json

- per-position STWQ tables (`{"kind": "stwq", "mode": "per_position"}`) instead of sink/rest groups;
- the attention matmuls left in float (`quantize_attention: false`).
"""

import argparse
import copy
import json
from pathlib import Path

from probe import calibration, heldout

from quantcore.eval.fidelity import teacher_forced_fidelity
from quantcore.pipeline import quantize
from quantcore.recipe import Recipe, parse_bits

OFFICIAL = [{"kind": "smoothquant"}, {"kind": "shift"}, {"kind": "gps"}]
PER_POSITION = {"kind": "stwq", "mode": "per_position"}
VARIANTS = {
    "ptq4arvg": {"passes": [*OFFICIAL, {"kind": "stwq"}]},
    "ptq4arvg, per-position stwq": {"passes": [*OFFICIAL, PER_POSITION]},
    "rtn, per-position stwq": {"passes": [PER_POSITION]},
    "ptq4arvg, attention matmuls in float": {
        "passes": [*OFFICIAL, {"kind": "stwq"}],
        "quantize_attention": False,
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="w8a8,w6a6")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--heldout", type=int, default=256)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    fp, classes, tokens = heldout(args.heldout)
    calib = calibration(fp, args.calib_samples)
    result = {}
    for bits in args.bits.split(","):
        w, a = parse_bits(bits)
        for name, fields in VARIANTS.items():
            recipe = Recipe.parse({"name": name, "w_bits": w, "a_bits": a, **fields})
            model = copy.deepcopy(fp.model)
            quantize(model, recipe, calib, batch_size=64)
            metrics = teacher_forced_fidelity(fp.model, model, classes, tokens)
            result.setdefault(bits, {})[name] = {k: round(v, 5) for k, v in metrics.items()}
            print(bits, name, result[bits][name], flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
