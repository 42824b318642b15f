"""A static index.html: a title, a table of headline numbers, and figures with captions (their SVG, hover values
included, with the PNG as fallback)."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

from implicit_icl.atomic import write_atomically
from implicit_icl.errors import ImplicitICLError


@dataclass(frozen=True)
class ReportFigure:
    """A figure file (relative to the report folder) and a caption saying what it shows."""

    file: str
    caption: str


def write_json(path: Path, data: dict) -> Path:
    return write_atomically(path, lambda temporary: temporary.write_text(json.dumps(data, indent=1) + "\n"))


def write_report(
    directory: Path, title: str, intro: str, summary: dict[str, object], figures: list[ReportFigure]
) -> Path:
    """Write directory/index.html showing `summary` as a table and every figure with its caption."""
    rows = "\n".join(
        f"<tr><td>{html.escape(str(key))}</td><td>{html.escape(cell(value))}</td></tr>"
        for key, value in summary.items()
    )
    blocks = "\n".join(figure_html(figure.file, figure.caption) for figure in figures)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; }}
table {{ border-collapse: collapse; }} td {{ border-bottom: 1px solid #ddd; padding: 0.2rem 0.8rem; }}
figure {{ margin: 2rem 0; }} img, object {{ max-width: 100%; }} figcaption {{ color: #333; font-size: 0.95rem; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(intro)}</p>
<table>{rows}</table>
{blocks}
</body></html>
"""
    return write_atomically(Path(directory) / "index.html", lambda temporary: temporary.write_text(page))


def figure_html(file: str, caption: str) -> str:
    """A figure: its SVG (hover values, report/hover.py) where one sits beside the PNG, else the PNG itself."""
    image = f'<img src="{html.escape(file)}" alt="{html.escape(caption)}">'
    if file.endswith(".png"):
        svg = html.escape(file.removesuffix(".png") + ".svg")
        image = f'<object data="{svg}" type="image/svg+xml" aria-label="{html.escape(caption)}">{image}</object>'
    return f"<figure>{image}<figcaption>{html.escape(caption)}</figcaption></figure>"


def cell(value: object) -> str:
    """A table cell: floats with 3 significant digits (scientific when tiny or huge)."""
    if isinstance(value, float):
        return f"{value:.3g}" if 1e-3 <= abs(value) < 1e4 or value == 0 else f"{value:.2e}"
    return str(value)


def markdown(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table; a "|" inside a cell is escaped."""

    def line(cells: list[object]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


def check_out_folder(out: Path) -> None:
    """Refuse, before any work, an --out that names a file."""
    if Path(out).exists() and not Path(out).is_dir():
        raise ImplicitICLError(f"--out {out} is a file, not a folder; give a folder for the report")
