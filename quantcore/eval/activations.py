"""Activation statistics of every quantized input: does a model have what PTQ4ARVG quantizes against?

The paper's models show (reference §1, challenge figure) (a) channel outliers in AdaLN-modulated inputs
up to ~8 against typical values below 1, (b) smooth but strongly position-dependent ranges, (c) a sink
token (the condition) with a range near 32 against a few for the rest. Per linear input (float model,
teacher-forced on the given sequences) this measures:
- channel absmax: max over channels against their median (a);
- position absmax: per position (VAR: also per scale), its spread, and the first position against the
  median of the rest (b, c);
and a model summary: the largest of each ratio and where it is.
"""

from __future__ import annotations

import torch

from quantcore.quant.layout import QuantLayout


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b > 0 else float("inf")


def input_statistics(
    channel: torch.Tensor, position: torch.Tensor, groups: torch.Tensor | None = None
) -> dict:
    """Statistics of one linear input from its absmax per channel (C,) and per position (T,) (T = 1 for a
    per-sample condition)."""
    rest = position[1:] if position.numel() > 1 else position
    out = {
        "channel_absmax_max": round(float(channel.max()), 4),
        "channel_absmax_median": round(float(channel.median()), 4),
        "channel_outlier_ratio": _ratio(float(channel.max()), float(channel.median())),
        "outlier_channels": torch.topk(channel, min(4, channel.numel())).indices.tolist(),
        "first_position_absmax": round(float(position[0]), 4),
        "rest_position_absmax_median": round(float(rest.median()), 4),
        "first_position_ratio": _ratio(float(position[0]), float(rest.median())),
        "position_absmax_max_over_min": _ratio(float(position.max()), float(position.min())),
        "position_absmax": [round(v, 3) for v in position.tolist()],
    }
    if groups is not None and position.numel() > 1:
        groups = groups[: position.numel()]
        out["group_absmax"] = [
            round(float(position[groups == g].max()), 3) for g in torch.unique(groups).tolist()
        ]
    return out


@torch.no_grad()
def activation_statistics(
    model, layout: QuantLayout, classes: torch.Tensor, tokens: torch.Tensor, batch_size: int = 64
) -> dict:
    """{"inputs": {linear: statistics}, "summary": {...}} on the float model's teacher-forced pass."""
    channel: dict[str, torch.Tensor] = {}
    position: dict[str, torch.Tensor] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        x = x.detach().float().abs()
        x = x if x.dim() == 3 else x[:, None]
        c, t = x.amax(dim=(0, 1)).cpu(), x.amax(dim=(0, 2)).cpu()
        channel[name] = c if name not in channel else torch.maximum(channel[name], c)
        position[name] = t if name not in position else torch.maximum(position[name], t)

    hooks = [
        model.get_submodule(name).register_forward_pre_hook(lambda m, args, name=name: observe(name, args[0]))
        for name in layout.all_linears
    ]
    try:
        for start in range(0, classes.numel(), batch_size):
            model.sequence_logits(classes[start : start + batch_size], tokens[start : start + batch_size])
    finally:
        for h in hooks:
            h.remove()
    inputs = {}
    for name in channel:
        groups = layout.position_groups if position[name].numel() == layout.seq_len else None
        inputs[name] = input_statistics(channel[name], position[name], groups)
    return {"inputs": inputs, "summary": summarize(inputs, layout)}


def summarize(inputs: dict[str, dict], layout: QuantLayout) -> dict:
    """The largest channel-outlier and first-position ratios (where, and their values), over the sites the
    smoothing passes act on and over every input."""
    site_inputs = {s.linears[0] for s in layout.fold_sites}

    def top(key: str, names) -> dict:
        name = max(names, key=lambda n: inputs[n][key])
        return {"linear": name, "ratio": inputs[name][key]}

    return {
        "channel_outlier_ratio_max_fold_sites": top("channel_outlier_ratio", site_inputs & inputs.keys()),
        "channel_outlier_ratio_max": top("channel_outlier_ratio", inputs.keys()),
        "first_position_ratio_max": top("first_position_ratio", inputs.keys()),
        "paper": {
            "channel_outliers": "AdaLN-modulated channels up to ~8 against typical values below 1",
            "sink_token": "condition token range ~32 against a few for the other tokens",
        },
    }
