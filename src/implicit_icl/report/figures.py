"""Line plots with confidence bands, saved as PNG and SVG."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from implicit_icl.atomic import write_atomically  # noqa: E402


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
    for curve in curves:
        (line,) = axis.plot(curve.x, curve.y, curve.style, label=curve.label, linewidth=1.6, markersize=4)
        if curve.low is not None and curve.high is not None:
            axis.fill_between(curve.x, curve.low, curve.high, color=line.get_color(), alpha=0.2, linewidth=0)
    axis.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if log_y:
        axis.set_yscale("log")
    if ylim is not None:
        axis.set_ylim(*ylim)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    paths = []
    for suffix in (".png", ".svg"):
        target = Path(stem).with_suffix(suffix)
        paths.append(write_atomically(target, lambda path, s=suffix: figure.savefig(path, format=s[1:])))
    plt.close(figure)
    return paths
