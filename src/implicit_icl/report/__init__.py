"""Static reports: matplotlib figures (PNG + SVG), an index.html that shows them, metrics as JSON."""

from implicit_icl.report.figures import Curve, plot_curves, plot_heatmap
from implicit_icl.report.html import ReportFigure, write_json, write_report

__all__ = ["Curve", "ReportFigure", "plot_curves", "plot_heatmap", "write_json", "write_report"]
