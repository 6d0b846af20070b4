"""Activation statistics of a bundled model's quantized linear inputs (FP, teacher-forced on held-out
test-split sequences), beside the paper's challenge figure: channel outliers (per-channel abs-max, max
against median), per-position ranges, and the condition/sink tokens against the rest.

    .venv/bin/python bench/quality/ranges.py --model deep-llamagen --out bench/quality/deep-llamagen

Writes OUT/ranges.json (every input) and OUT/ranges.md (the table and the headline figures).
"""

import argparse
import json
from pathlib import Path

import torch
from probe import heldout

from quantcore.compare import environment
from quantcore.pipeline import layout_of

# The paper's challenge figure (shared/reference/ptq4arvg.md): AdaLN-modulated channels up to ~8 where
# typical values stay well below 1; the condition token's range ~32 against a few for the rest.
PAPER = {"channel_max_over_median": 8.0, "sink_range_over_rest": 32.0 / 3.0}


def summary(x: torch.Tensor, sinks: tuple[int, ...]) -> dict:
    """Statistics of one linear's input x, (B, L, C); (B, C) or (B, 1, C) for inputs with no token axis
    (VAR's AdaLN condition)."""
    x = x.float()
    channel = x.abs().flatten(0, -2).amax(0)  # per-channel abs-max
    row = {
        "channel_absmax_max": float(channel.max()),
        "channel_absmax_median": float(channel.median()),
        "channel_max_over_median": float(channel.max() / channel.median().clamp_min(1e-12)),
        "outlier_channels": int((channel > 4 * channel.median()).sum()),  # > 4x the median channel
    }
    if x.dim() == 3 and x.shape[1] > 1:
        # per-position range: max - min over samples and channels
        ranges = x.amax(dim=(0, 2)) - x.amin(dim=(0, 2))
        rest = torch.ones_like(ranges, dtype=torch.bool)
        rest[list(sinks)] = False
        row.update(
            position_range_first=float(ranges[0]),
            sink_range_max=float(ranges[list(sinks)].max()),
            rest_range_median=float(ranges[rest].median()),
            rest_range_max=float(ranges[rest].max()),
            sink_range_over_rest=float(ranges[list(sinks)].max() / ranges[rest].median().clamp_min(1e-12)),
            widest_position=int(ranges.argmax()),
            position_ranges=[round(float(v), 4) for v in ranges],
        )
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def headline(result: dict) -> dict:
    per_token = [r for r in result.values() if "sink_range_over_rest" in r]
    return {
        "channel_max_over_median_max": max(r["channel_max_over_median"] for r in result.values()),
        "channel_max_over_median_median": float(
            torch.tensor([r["channel_max_over_median"] for r in result.values()]).median()
        ),
        "sink_range_over_rest_max": max(r["sink_range_over_rest"] for r in per_token),
        "sink_range_max": max(r["sink_range_max"] for r in per_token),
        "rest_range_median_median": float(torch.tensor([r["rest_range_median"] for r in per_token]).median()),
    }


def render(model: str, report: dict) -> str:
    h = report["headline"]
    lines = [
        f"# Activation statistics of {model} (FP, {report['heldout']} held-out test-split sequences)",
        "",
        f"Machine: {report['environment']}. Sink positions (the layout's): {report['sink_positions']}.",
        "",
        "| figure | this model | paper (challenge figure) |",
        "| --- | --- | --- |",
        f"| channel abs-max, max / median (largest over inputs) | {h['channel_max_over_median_max']:.2f} | "
        f"~8 against typical < 1 (≥ {PAPER['channel_max_over_median']:.0f}) |",
        f"| same, median over inputs | {h['channel_max_over_median_median']:.2f} | |",
        f"| condition/sink token range / median range of the rest (largest) | {h['sink_range_over_rest_max']:.2f} | "
        f"~32 against a few (≈ {PAPER['sink_range_over_rest']:.0f}) |",
        f"| largest sink range; median rest range | {h['sink_range_max']:.2f}; "
        f"{h['rest_range_median_median']:.2f} | ~32; a few |",
        "",
        "| input of | channel max | channel median | max/median | channels > 4x median | sink range | "
        "rest range median | rest range max | sink/rest |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in report["inputs"].items():
        token = (
            f"{r['sink_range_max']:.2f} | {r['rest_range_median']:.2f} | {r['rest_range_max']:.2f} | "
            f"{r['sink_range_over_rest']:.2f}"
            if "sink_range_max" in r
            else "– | – | – | – (no token axis)"
        )
        lines.append(
            f"| {name} | {r['channel_absmax_max']:.2f} | {r['channel_absmax_median']:.2f} | "
            f"{r['channel_max_over_median']:.2f} | {r['outlier_channels']} | {token} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llamagen")
    parser.add_argument("--heldout", type=int, default=256)
    parser.add_argument("--out", type=Path, help="folder for ranges.json and ranges.md")
    args = parser.parse_args()
    fp, classes, tokens = heldout(args.heldout, args.model)
    model, layout = fp.model, layout_of(fp.model)
    inputs: dict = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: inputs.update({n: summary(a[0], layout.sink_positions)})
        )
        for n in layout.all_linears
    ]
    model.sequence_logits(classes, tokens)
    for h in hooks:
        h.remove()
    env = environment()
    report = {
        "model": args.model,
        "heldout": args.heldout,
        "environment": env,
        "sink_positions": list(layout.sink_positions),
        "paper": PAPER,
        "headline": headline(inputs),
        "inputs": inputs,
    }
    text = render(args.model, report)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ranges.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "ranges.md").write_text(text)


if __name__ == "__main__":
    main()
