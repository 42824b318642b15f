"""Hover values in the reports' SVG figures: every drawn point, bar and heat-map cell carries a <title>, which a
browser shows as a tooltip when the pointer rests on it (the pages embed the SVG, with the PNG as fallback).

A plot marks artists with `Hover.mark` (a bar, a heat map's mesh) or `Hover.points` (invisible markers on a
curve's points); matplotlib writes each marked artist as <g id="hover-N">, whose drawn elements (one per point,
bar or cell, in data order) get their titles after savefig (`add_titles`). A group whose element count differs
from its titles gets none: no tooltip rather than a wrong one.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from pathlib import Path

SVG = "http://www.w3.org/2000/svg"
DRAWN = ("path", "use", "rect", "circle")


class Hover:
    """The titles of a figure's marked artists, by group id."""

    def __init__(self) -> None:
        self.titles: dict[str, list[str]] = {}

    def mark(self, artist, titles: Sequence[str]) -> None:
        """Give `artist` (drawn as len(titles) elements, in order) the titles."""
        gid = f"hover-{len(self.titles)}"
        artist.set_gid(gid)
        self.titles[gid] = list(titles)

    def points(self, axis, x: Sequence[float], y: Sequence[float], titles: Sequence[str], log_y: bool = False):
        """Invisible markers on the points (x_i, y_i) that matplotlib draws (finite, and positive on a log axis)."""
        kept = [
            (xi, yi, title)
            for xi, yi, title in zip(x, y, titles, strict=True)
            if math.isfinite(xi) and math.isfinite(yi) and (yi > 0 or not log_y)
        ]
        if kept:
            xs, ys, shown = zip(*kept, strict=True)
            self.mark(axis.scatter(xs, ys, s=49, alpha=0.0, zorder=5), shown)


def value(number: float) -> str:
    """A number as a tooltip shows it: 4 significant digits, "n/a" for NaN."""
    return "n/a" if not math.isfinite(number) else f"{number:.4g}"


def add_titles(svg_path: Path, titles: dict[str, list[str]]) -> None:
    """Insert the titles into the SVG file's marked groups (see the module docstring), in place."""
    for _, (prefix, uri) in ET.iterparse(svg_path, events=["start-ns"]):
        ET.register_namespace(prefix, uri)
    tree = ET.parse(svg_path)
    for group in tree.getroot().iter(f"{{{SVG}}}g"):
        wanted = titles.get(group.get("id", ""))
        if wanted is None:
            continue
        elements = list(_drawn(group))
        if len(elements) != len(wanted):
            continue
        for element, text in zip(elements, wanted, strict=True):
            title = ET.Element(f"{{{SVG}}}title")
            title.text = text
            element.insert(0, title)
    tree.write(svg_path, encoding="utf-8", xml_declaration=True)


def _drawn(element) -> Iterator[ET.Element]:
    """The drawn elements under `element` in document order, leaving out definitions and clip paths."""
    for child in element:
        tag = child.tag.rsplit("}", 1)[-1]
        if tag in ("defs", "clipPath", "title"):
            continue
        if tag in DRAWN:
            yield child
        else:
            yield from _drawn(child)
