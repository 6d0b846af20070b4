"""Activation ranges of tiny-llamagen's linear inputs (FP) on held-out test-split sequences: is there a sink
token (one position with a much larger range) or channel outliers, as in the paper's models?

    .venv/bin/python bench/quality/ranges.py --out bench/quality/tiny-llamagen/ranges.json
"""

import argparse
import json
from pathlib import Path

import torch
from probe import heldout

from quantcore.pipeline import layout_of


def summary(x: torch.Tensor) -> dict:
    """Per-position abs-max (position 0 = the class token) and per-channel max-min of x (B, L, C)."""
    pos = x.abs().amax(dim=(0, 2))
    chan = x.amax(dim=(0, 1)) - x.amin(dim=(0, 1))
    return {
        "pos0_absmax": round(float(pos[0]), 3),
        "pos1_absmax": round(float(pos[1]), 3),
        "pos_median_absmax": round(float(pos.median()), 3),
        "pos_max_absmax": round(float(pos.max()), 3),
        "pos_argmax": int(pos.argmax()),
        "channel_range_median": round(float(chan.median()), 3),
        "channel_range_max": round(float(chan.max()), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heldout", type=int, default=256)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    fp, classes, tokens = heldout(args.heldout)
    model = fp.model
    result = {}
    names = layout_of(model).all_linears
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: result.update({n: summary(a[0])}))
        for n in names
    ]
    model.sequence_logits(classes, tokens)
    for h in hooks:
        h.remove()
    for name, row in result.items():
        print(name, row)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
