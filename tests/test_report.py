"""The static report writer: figures as PNG and SVG, index.html, JSON written atomically."""

import json
import os

import pytest

from implicit_icl.report import Curve, ReportFigure, plot_curves, write_json, write_report


def test_plot_curves_writes_png_and_svg(tmp_path):
    curves = [Curve("a <b>", [0, 1, 2], [1.0, 0.5, 0.25], [0.9, 0.4, 0.2], [1.1, 0.6, 0.3]), Curve("c", [0, 2], [1, 1])]
    paths = plot_curves(tmp_path / "fig", curves, "x", "y", "title", log_y=True)
    assert [p.name for p in paths] == ["fig.png", "fig.svg"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in paths[1].read_text()
    assert sorted(os.listdir(tmp_path)) == ["fig.png", "fig.svg"]  # no temporary file left behind


def test_report_shows_every_figure_with_its_caption_escaped(tmp_path):
    figures = [ReportFigure("one.png", "first <figure> & caption"), ReportFigure("two.png", "second")]
    page = write_report(tmp_path, "T & title", "intro", {"error": 1.5e-12, "prompts": 10}, figures).read_text()
    assert '<img src="one.png"' in page and '<img src="two.png"' in page
    assert "first &lt;figure&gt; &amp; caption" in page and "<figure>" in page
    assert "1.50e-12" in page and "T &amp; title" in page


def test_json_replaces_atomically_and_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"a": 1})
    with pytest.raises(TypeError):
        write_json(target, {"a": object()})
    assert json.loads(target.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["metrics.json"]
