"""Line plots with confidence bands and heat maps, saved as PNG and SVG (the SVG with hover values, report/hover.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from implicit_icl.atomic import write_atomically  # noqa: E402
from implicit_icl.report.hover import Hover, add_titles, value  # noqa: E402


@dataclass(frozen=True)
class Curve:
    """One line: y over x, with an optional band [low, high] (e.g. a bootstrap 95% interval)."""

    label: str
    x: list[float]
    y: list[float]
    low: list[float] | None = None
    high: list[float] | None = None
    style: str = "-"


def plot_curves(
    stem: Path,
    curves: list[Curve],
    xlabel: str,
    ylabel: str,
    title: str,
    log_y: bool = False,
    ylim: tuple[float, float] | None = None,
) -> list[Path]:
    """Draw the curves on one axis and write stem.png and stem.svg; returns both paths."""
    figure, axis = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    hover = Hover()
    for curve in curves:
        (line,) = axis.plot(curve.x, curve.y, curve.style, label=curve.label, linewidth=1.6, markersize=4)
        titles = [
            f"{curve.label}: {xlabel} {value(x)}, {ylabel} {value(y)}" for x, y in zip(curve.x, curve.y, strict=True)
        ]
        if curve.low is not None and curve.high is not None:
            axis.fill_between(curve.x, curve.low, curve.high, color=line.get_color(), alpha=0.2, linewidth=0)
            bands = zip(titles, curve.low, curve.high, strict=True)
            titles = [f"{title} [{value(low)}, {value(high)}]" for title, low, high in bands]
        hover.points(axis, curve.x, curve.y, titles, log_y=log_y)
    axis.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if log_y:
        axis.set_yscale("log")
    if ylim is not None:
        axis.set_ylim(*ylim)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, stem, hover)


def plot_heatmap(
    stem: Path,
    values: list[list[float]],
    xlabel: str,
    ylabel: str,
    title: str,
    x: list[float] | None = None,
    log_color: bool = True,
    colorbar: str = "",
    marks: list[float] | None = None,
) -> list[Path]:
    """values [rows, columns] as an image (row 0 at the bottom), x the column coordinates (default 0..); a
    logarithmic colour scale unless log_color=False; marks: x positions drawn as thin vertical lines; writes
    stem.png and stem.svg and returns both paths."""
    import numpy as np
    from matplotlib.colors import LogNorm

    data = np.asarray(values, dtype=float)
    columns = np.arange(data.shape[1]) if x is None else np.asarray(x, dtype=float)
    figure, axis = plt.subplots(figsize=(7.2, 4.2), dpi=110)
    positive = data[np.isfinite(data) & (data > 0)]
    norm = LogNorm(positive.min(), positive.max()) if log_color and positive.size else None
    mesh = axis.pcolormesh(columns, np.arange(data.shape[0]), data, shading="nearest", norm=norm, cmap="viridis")
    figure.colorbar(mesh, ax=axis, label=colorbar)
    hover = Hover()  # the mesh draws its cells row by row
    hover.mark(
        mesh,
        [
            f"{ylabel} {row}, {xlabel} {value(float(columns[column]))}: {colorbar or 'value'} {value(float(data[row, column]))}"
            for row in range(data.shape[0])
            for column in range(data.shape[1])
        ],
    )
    for mark in marks or []:
        axis.axvline(mark, color="white", linewidth=0.8, linestyle="--", alpha=0.8)
    axis.set(xlabel=xlabel, ylabel=ylabel, title=title)
    figure.tight_layout()
    return save_figure(figure, stem, hover)


def save_figure(figure, stem: Path, hover: Hover | None = None) -> list[Path]:
    """Write the figure as stem.png and stem.svg (each atomically; the SVG with the hover titles), close it,
    and return both paths."""

    def write(path: Path, suffix: str) -> None:
        figure.savefig(path, format=suffix[1:])
        if suffix == ".svg" and hover is not None and hover.titles:
            add_titles(path, hover.titles)

    paths = []
    for suffix in (".png", ".svg"):
        target = Path(stem).with_suffix(suffix)
        paths.append(write_atomically(target, lambda path, s=suffix: write(path, s)))
    plt.close(figure)
    return paths
