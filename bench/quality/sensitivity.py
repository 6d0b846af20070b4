"""Where the quantization error of tiny-llamagen comes from: teacher-forced logit KL vs FP on held-out
test-split sequences, with one group of quantizers switched on at a time.

    .venv/bin/python bench/quality/sensitivity.py --bits w8a8 --recipes rtn,ptq4arvg,dtwq \
        --out bench/quality/tiny-llamagen/sensitivity-w8a8.json

Each probe keeps every weight and activation quantizer off except the ones it names (all other
settings as calibrated by the recipe); the value is KL(FP || probe) in nats/token.
"""

import argparse
import copy
import json
from pathlib import Path

from probe import calibration, heldout

from quantcore.eval.fidelity import teacher_forced_fidelity
from quantcore.pipeline import quantize
from quantcore.quant.modules import QuantLinear, iter_quant_modules, set_quant_mode
from quantcore.recipe import Recipe, parse_bits


def enable_only(model, pick) -> None:
    """Weights and activations off everywhere, then on for the quantizers `pick(name, role)` selects."""
    set_quant_mode(model, weights="off", acts="off")
    for name, module in iter_quant_modules(model):
        if isinstance(module, QuantLinear):
            if pick(name, "weight"):
                module.weight_quantizer.set_mode("on")
            if pick(name, "input"):
                module.input_quantizer.set_mode("on")
        else:
            for role in ("a", "b"):
                if pick(name, role):
                    getattr(module, f"{role}_quantizer").set_mode("on")


def probes(model) -> dict:
    names = [n for n, _ in iter_quant_modules(model)]
    out = {
        "all": lambda n, r: True,
        "weights only": lambda n, r: r == "weight",
        "linear inputs only": lambda n, r: r == "input",
        "attention matmuls only": lambda n, r: r in ("a", "b"),
        "softmax probs (pv.a) only": lambda n, r: n.endswith("matmul_pv") and r == "a",
    }
    for kind in ("wqkv", "wo", "w1", "w2", "output", "matmul_qk", "matmul_pv"):
        out[f"inputs of *{kind} only"] = lambda n, r, k=kind: n.endswith(k) and r != "weight"
    for n in names:
        if n.endswith(("w1", "w2", "wqkv", "wo", "output")):
            out[f"input of {n}"] = lambda x, r, n=n: x == n and r == "input"
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bits", default="w8a8")
    parser.add_argument("--recipes", default="rtn,ptq4arvg,dtwq")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--heldout", type=int, default=256)
    parser.add_argument("--out", type=Path, help="JSON file for {probe: {recipe: KL}}")
    args = parser.parse_args()
    fp, classes, tokens = heldout(args.heldout)
    calib = calibration(fp, args.calib_samples)
    w, a = parse_bits(args.bits)
    result = {}
    for recipe in args.recipes.split(","):
        model = copy.deepcopy(fp.model)
        quantize(model, Recipe.preset(recipe, w, a), calib, batch_size=64)
        for probe, pick in probes(model).items():
            enable_only(model, pick)
            kl = teacher_forced_fidelity(fp.model, model, classes, tokens)["logit_kl"]
            result.setdefault(probe, {})[recipe] = round(kl, 5)
    print(f"{'probe':<40}" + "".join(f"{r:>12}" for r in args.recipes.split(",")))
    for probe, row in result.items():
        print(f"{probe:<40}" + "".join(f"{v:>12.5f}" for v in row.values()))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
