"""Plots as inline SVG, drawn on the server: no JavaScript, no network, readable by screen readers
(role="img" with a title and a description; the numbers are in a table beside every plot)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import count

from markupsafe import Markup, escape

# Okabe-Ito: distinguishable with the common colour-vision deficiencies, dark enough on white
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
_ids = count()


def _number(value: float) -> str:
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000 or magnitude < 0.01:
        return f"{value:.2e}"
    return f"{value:.3g}"


def _frame(width: int, height: int, title: str, description: str, body: list[str]) -> Markup:
    uid = next(_ids)
    return Markup(
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-labelledby="plot-t{uid} plot-d{uid}">'
        f'<title id="plot-t{uid}">{escape(title)}</title><desc id="plot-d{uid}">{escape(description)}</desc>'
        + "".join(body)
        + "</svg>"
    )


def _ticks(low: float, high: float, n: int = 4) -> list[float]:
    if high <= low:
        return [low]
    return [low + (high - low) * i / n for i in range(n + 1)]


def line_chart(
    title: str,
    x_labels: Sequence[str],
    series: dict[str, dict[str, float]],
    y_label: str,
    width: int = 560,
    height: int = 280,
) -> Markup:
    """One line per series over categorical x positions (e.g. bit-widths); missing points are gaps."""
    left, right, top, bottom = 64, 140, 16, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [v for points in series.values() for v in points.values() if math.isfinite(v)]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    if high == low:
        low, high = low - (abs(low) * 0.1 or 0.5), high + (abs(high) * 0.1 or 0.5)
    pad = (high - low) * 0.08
    low, high = low - pad, high + pad

    def x_at(i: int) -> float:
        return left + (plot_w * (i + 0.5) / max(1, len(x_labels)))

    def y_at(v: float) -> float:
        return top + plot_h * (1 - (v - low) / (high - low))

    body = [
        f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}"/>',
        f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}"/>',
    ]
    for tick in _ticks(low, high):
        y = y_at(tick)
        body.append(f'<line class="grid" x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}"/>')
        body.append(
            f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_number(tick)}</text>'
        )
    for i, label in enumerate(x_labels):
        body.append(
            f'<text class="tick" x="{x_at(i):.1f}" y="{top + plot_h + 18}" text-anchor="middle">'
            f"{escape(label)}</text>"
        )
    body.append(
        f'<text class="label" x="14" y="{top + plot_h / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2:.1f})">{escape(y_label)}</text>'
    )
    for n, (name, points) in enumerate(sorted(series.items())):
        colour = PALETTE[n % len(PALETTE)]
        coords = [(x_at(i), y_at(points[x])) for i, x in enumerate(x_labels) if x in points]
        if len(coords) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
            body.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        for x, y in coords:
            body.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colour}"/>')
        ly = top + 14 + 18 * n
        body.append(f'<rect x="{left + plot_w + 14}" y="{ly - 9}" width="12" height="12" fill="{colour}"/>')
        body.append(f'<text class="legend" x="{left + plot_w + 32}" y="{ly + 1}">{escape(name)}</text>')
    description = "; ".join(
        f"{name}: " + ", ".join(f"{x} {_number(v)}" for x, v in points.items())
        for name, points in sorted(series.items())
    )
    return _frame(width, height, title, description or "no data", body)


def bar_chart(title: str, bars: Sequence[tuple[str, float]], value_label: str, width: int = 560) -> Markup:
    """Horizontal bars, one per (label, value), longest = largest value."""
    left, right, row = 190, 70, 18
    height = 24 + row * len(bars)
    top = 8
    peak = max((abs(v) for _, v in bars), default=0.0) or 1.0
    plot_w = width - left - right
    body = [f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{height - 14}"/>']
    for i, (label, value) in enumerate(bars):
        y = top + row * i
        bar = plot_w * abs(value) / peak
        body.append(
            f'<text class="tick" x="{left - 6}" y="{y + 12}" text-anchor="end">{escape(label)}</text>'
            f'<rect x="{left}" y="{y + 2}" width="{bar:.1f}" height="{row - 5}" fill="{PALETTE[0]}"/>'
            f'<text class="tick" x="{left + bar + 4:.1f}" y="{y + 12}">{_number(value)}</text>'
        )
    body.append(
        f'<text class="label" x="{left + plot_w / 2:.1f}" y="{height - 2}" text-anchor="middle">'
        f"{escape(value_label)}</text>"
    )
    description = ", ".join(f"{label} {_number(v)}" for label, v in bars)
    return _frame(width, height, title, description or "no data", body)
