"""Hover values in the reports' SVG figures: every drawn point, bar and heat-map cell carries its own value."""

import math
import xml.etree.ElementTree as ET

from implicit_icl.report import Curve, ReportFigure, plot_curves, plot_heatmap, write_report
from implicit_icl.report.pages import Bars, Page, plot_bars

SVG = "{http://www.w3.org/2000/svg}"


def titles(path) -> list[str]:
    return [title.text for title in ET.parse(path).getroot().iter(f"{SVG}title")]


def hovered(path) -> dict[str, list[str]]:
    """Per marked group, the titles of its drawn elements, in document order."""
    groups = {}
    for group in ET.parse(path).getroot().iter(f"{SVG}g"):
        if group.get("id", "").startswith("hover-"):
            groups[group.get("id")] = [t.text for t in group.iter(f"{SVG}title")]
    return groups


def test_every_curve_point_has_its_values_and_band(tmp_path):
    curves = [
        Curve("trained", [1, 2, 3], [0.5, 0.25, 0.125], low=[0.4, 0.2, 0.1], high=[0.6, 0.3, 0.15]),
        Curve("untrained", [1, 2, 3], [1.0, math.nan, 0.0]),  # NaN is not drawn; 0 is not on a log axis
    ]
    _, svg = plot_curves(tmp_path / "fig", curves, "shots", "probability", "t", log_y=True)
    assert list(hovered(svg).values()) == [
        ["trained: shots 1, probability 0.5 [0.4, 0.6]", "trained: shots 2, probability 0.25 [0.2, 0.3]",
         "trained: shots 3, probability 0.125 [0.1, 0.15]"],
        ["untrained: shots 1, probability 1"],
    ]  # fmt: skip
    # the markers carrying the titles sit where the line's points are: one per drawn point
    root = ET.parse(svg).getroot()
    marked = [g for g in root.iter(f"{SVG}g") if g.get("id") == "hover-0"][0]
    assert len([u for u in marked.iter(f"{SVG}use")]) == 3


def test_every_heatmap_cell_has_its_row_column_and_value(tmp_path):
    values = [[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]]
    _, svg = plot_heatmap(tmp_path / "map", values, "prefix", "layer", "t", x=[0, 5, 10], colorbar="norm")
    (cells,) = hovered(svg).values()
    assert cells == [
        f"layer {row}, prefix {x}: norm {values[row][column]:g}"
        for row in range(2)
        for column, x in enumerate([0, 5, 10])
    ]
    # cells off the log colour scale (NaN, 0) are still drawn, so the titles stay in step
    _, svg = plot_heatmap(tmp_path / "holes", [[1.0, math.nan], [0.0, 2.0]], "prefix", "layer", "t")
    assert list(hovered(svg).values()) == [["layer 0, prefix 0: value 1", "layer 0, prefix 1: value n/a",
                                            "layer 1, prefix 0: value 0", "layer 1, prefix 1: value 2"]]  # fmt: skip


def test_every_bar_has_its_group_value_and_interval(tmp_path):
    series = [Bars("ICL", [0.9, 0.5], [0.8, 0.4], [1.0, 0.6]), Bars("zero-shot", [0.1, 0.2])]
    _, svg = plot_bars(tmp_path / "bars", ["antonym", "copy"], series, "accuracy", "t")
    assert sorted(titles(svg)) == sorted(
        ["ICL, antonym: 0.9 [0.8, 1]", "ICL, copy: 0.5 [0.4, 0.6]", "zero-shot, antonym: 0.1", "zero-shot, copy: 0.2"]
    )
    assert all(len(group) == 1 for group in hovered(svg).values())


def test_pages_embed_the_svg_with_the_png_as_fallback(tmp_path):
    page = Page("study")
    page.figure("accuracy.png", "what it shows")
    written = page.write(tmp_path).read_text()
    assert '<object data="accuracy.svg" type="image/svg+xml"' in written and '<img src="accuracy.png"' in written
    report = write_report(tmp_path, "t", "i", {}, [ReportFigure("one.png", "c")]).read_text()
    assert '<object data="one.svg"' in report and '<img src="one.png"' in report
