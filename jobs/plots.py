"""A stage's curves from its metrics records: the PNGs `evaluate` writes and the SVGs of
`rlhf report` are drawn by the same function."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from jobs.sinks import numbers


def series_of(records: list[dict[str, Any]], keys: tuple[str, ...] | None = None):
    """(step, value) per metric over the records; ``keys`` in their order, or every
    numeric metric; only those with two points or more (a curve)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for record in records:
        for key, value in numbers(record).items():
            if (keys is None or key in keys) and math.isfinite(value):
                series.setdefault(key, []).append((record.get("step", 0), value))
    order = keys if keys is not None else tuple(series)
    return {key: series[key] for key in order if len(series.get(key, [])) >= 2}


def draw_curves(
    name: str,
    records: list[dict[str, Any]],
    out: Path | None = None,
    keys: tuple[str, ...] | None = None,
    columns: int = 5,
) -> tuple[list[str], str]:
    """A panel per curve: written to ``out`` (its suffix picks the format), or returned
    as SVG text; and the curves drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = series_of(records, keys)
    if not series:
        return [], ""
    columns = min(columns, len(series))
    rows = math.ceil(len(series) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.7 * rows), squeeze=False)
    for axis, (key, points) in zip(axes.flat, series.items(), strict=False):
        steps, values = zip(*points, strict=True)
        axis.plot(steps, values, marker="." if len(points) < 60 else None)
        axis.set_title(f"{name}: {key}", fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(series) :]:
        axis.set_visible(False)
    figure.tight_layout()
    svg = ""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, dpi=80)
    else:
        buffer = io.StringIO()
        with matplotlib.rc_context({"svg.fonttype": "none"}):  # text as text: a small page
            figure.savefig(buffer, format="svg")
        svg = buffer.getvalue()
        svg = svg[svg.index("<svg") :]  # inline in a page: without the XML prologue
    plt.close(figure)
    return list(series), svg
