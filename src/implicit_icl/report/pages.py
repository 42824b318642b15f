"""Standalone HTML pages with several tables and figures, and the bar chart of accuracies per task.

`implicit_icl.report.write_report` shows one table of headline numbers; the studies need sections, tables with
column headers (tasks, layers, top tokens) and captions saying what is shown and on how many prompts.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from implicit_icl.atomic import write_atomically  # noqa: E402
from implicit_icl.report.figures import save_figure  # noqa: E402
from implicit_icl.report.hover import Hover, value  # noqa: E402
from implicit_icl.report.html import cell, check_out_folder, figure_html, markdown  # noqa: E402, F401 (re-exported)

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.92rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.2rem 0.7rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
caption { caption-side: bottom; text-align: left; color: #333; font-size: 0.9rem; padding-top: 0.3rem; }
figure { margin: 1.5rem 0; } img, object { max-width: 100%; } figcaption { color: #333; font-size: 0.9rem; }
code, pre { background: #f4f4f4; padding: 0 0.2rem; } pre { padding: 0.6rem; overflow-x: auto; }
"""


@dataclass
class Page:
    """An HTML page built in order: headings, paragraphs, preformatted text, tables and figures."""

    title: str
    blocks: list[str] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(f"<h2>{html.escape(text)}</h2>")

    def paragraph(self, text: str) -> None:
        self.blocks.append(f"<p>{html.escape(text)}</p>")

    def preformatted(self, text: str) -> None:
        self.blocks.append(f"<pre>{html.escape(text)}</pre>")

    def table(self, header: list[str], rows: list[list[object]], caption: str) -> None:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "\n".join("<tr>" + "".join(f"<td>{html.escape(cell(v))}</td>" for v in row) + "</tr>" for row in rows)
        self.blocks.append(
            f"<table><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead>\n<tbody>{body}</tbody></table>"
        )

    def figure(self, file: str, caption: str) -> None:
        self.blocks.append(figure_html(file, caption))

    def write(self, directory: Path) -> Path:
        """directory/index.html, written atomically."""
        body = "\n".join(self.blocks)
        page = (
            f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.title)}</title>'
            f"<style>{STYLE}</style></head><body>\n<h1>{html.escape(self.title)}</h1>\n{body}\n</body></html>\n"
        )
        return write_atomically(Path(directory) / "index.html", lambda temporary: temporary.write_text(page))


@dataclass(frozen=True)
class Bars:
    """One series of a grouped bar chart: a value per group, with an optional interval [low, high] each."""

    label: str
    values: list[float]
    low: list[float] | None = None
    high: list[float] | None = None


def plot_bars(stem: Path, groups: list[str], series: list[Bars], ylabel: str, title: str) -> list[Path]:
    """A grouped bar chart (one group per x label, one bar per series) as stem.png and stem.svg."""
    width = 0.8 / len(series)
    figure, axis = plt.subplots(figsize=(max(6.4, 0.45 * len(groups) * len(series) / 1.5), 4.4), dpi=110)
    hover = Hover()
    for index, bars in enumerate(series):
        x = [g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))]
        errors = None
        titles = [f"{bars.label}, {group}: {value(v)}" for group, v in zip(groups, bars.values, strict=True)]
        if bars.low is not None and bars.high is not None:
            errors = [
                [v - lo for v, lo in zip(bars.values, bars.low, strict=True)],
                [hi - v for v, hi in zip(bars.values, bars.high, strict=True)],
            ]
            titles = [f"{t} [{value(lo)}, {value(hi)}]" for t, lo, hi in zip(titles, bars.low, bars.high, strict=True)]
        drawn = axis.bar(x, bars.values, width, yerr=errors, capsize=2, label=bars.label, error_kw={"linewidth": 0.8})
        for rectangle, title in zip(drawn.patches, titles, strict=True):
            hover.mark(rectangle, [title])
    axis.set_xticks(range(len(groups)), groups, rotation=60, ha="right", fontsize=8)
    axis.set(ylabel=ylabel, title=title, ylim=(0, 1.18), yticks=[0, 0.2, 0.4, 0.6, 0.8, 1.0])
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8, ncol=len(series), loc="upper center")
    figure.tight_layout()
    return save_figure(figure, stem, hover)
