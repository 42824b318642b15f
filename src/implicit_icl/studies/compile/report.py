"""From runs of the compile study (`studies.compile.run_split`) to numbers, tables, figures and index.html.

Every run keeps its per-query scores, so a task's numbers pool the held-out queries of all its runs
(demonstration sets × seeds); intervals are bootstrap 95% intervals over those queries, resampled together
for all methods (paired). The spread over runs (the lowest and highest run) is shown next to them.
Recovery = (acc_method − acc_zero_shot) / (acc_ICL − acc_zero_shot), bootstrapped as a ratio, is reported only
where ICL beats zero-shot by at least `MIN_GAIN`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from implicit_icl.report import Curve, plot_curves, write_json
from implicit_icl.report.pages import Bars, Page, plot_bars
from implicit_icl.statistics import N_RESAMPLES

MIN_GAIN = 0.2
LABELS = {
    "zero_shot": "zero-shot",
    "compiled_default": "compiled (default)",
    "compiled": "compiled (best on dev)",
    "compiled_bias": "compiled, bias only",
    "compiled_output_side_only": "compiled, output side only",
    "compiled_input_side_only": "compiled, input side only",
    "task_vector": "task vector",
    "task_vector_mean": "task vector (mean of dummies)",
    "function_vector": "function vector",
    "exact_patch": "exact per-query patch",
    "icl": "ICL",
}
MAIN = ("zero_shot", "compiled_default", "compiled", "task_vector", "function_vector", "exact_patch", "icl")
PER_QUERY = ("correct", "agree", "kl")
REFERENCES = ("icl", "zero_shot", "task_vector", "function_vector")  # drawn as lines on the curve figures


def reference_lines(pooled: dict) -> dict[str, dict[str, float]]:
    """Per curve kind ("correct": accuracy, "agree": top-1 agreement), each reference method's pooled value."""
    return {
        key: {LABELS[m]: pooled[m][metric] for m in REFERENCES if m in pooled}
        for key, metric in (("correct", "accuracy"), ("agree", "top1_agreement"))
    }


def run_record(task: str, context: int, seed: int, run: dict) -> dict:
    """One run as JSON: per method its summary and its per-query scores; the choices made on dev; the sizes."""
    methods = {}
    for name, result in run["methods"].items():
        methods[name] = dict(
            result.summary(),
            correct=result.correct.int().tolist(),
            agree=result.agree.int().tolist(),
            kl=result.kl.tolist(),
        )
    record = dict(task=task, context=context, seed=seed, methods=methods, choices=run["choices"], sizes=run["sizes"])
    if "curves" in run:
        record["curves"] = run["curves"]
    return record


def _resampled_means(columns: Tensor, generator: torch.Generator) -> Tensor:
    """Means of the columns [N, m] over N_RESAMPLES bootstrap resamples of the rows: [R, m]."""
    n = columns.shape[0]
    picks = torch.randint(0, n, (N_RESAMPLES, n), generator=generator)
    counts = torch.zeros(N_RESAMPLES, n, dtype=torch.float64).scatter_add_(
        1, picks, torch.ones_like(picks, dtype=torch.float64)
    )
    return counts @ columns.double() / n


def _interval(values: Tensor) -> list[float]:
    low, high = values.quantile(torch.tensor([0.025, 0.975], dtype=values.dtype))
    return [float(low), float(high)]


def pooled_metrics(records: Sequence[dict], seed: int = 0) -> dict:
    """Per method, over the held-out queries of `records` pooled: accuracy, top-1 agreement and KL to ICL with
    paired bootstrap intervals, recovery (when defined), the spread over runs, and the mean costs."""
    names = [name for name in LABELS if all(name in record["methods"] for record in records)]
    columns = {
        (name, key): torch.tensor([v for record in records for v in record["methods"][name][key]], dtype=torch.float64)
        for name in names
        for key in PER_QUERY
    }
    keys = list(columns)
    stacked = torch.stack([columns[key] for key in keys], 1)
    means = _resampled_means(stacked, torch.Generator().manual_seed(seed))
    at = {key: index for index, key in enumerate(keys)}
    context_tokens = sum(record["sizes"]["context_tokens"] for record in records) / len(records)
    result = {"n_queries": stacked.shape[0], "n_runs": len(records), "context_tokens": context_tokens, "methods": {}}
    zero, icl = columns[("zero_shot", "correct")].mean(), columns[("icl", "correct")].mean()
    gain = means[:, at[("icl", "correct")]] - means[:, at[("zero_shot", "correct")]]
    for name in names:
        entry = {}
        for key, label in (("correct", "accuracy"), ("agree", "top1_agreement"), ("kl", "kl_to_icl")):
            entry[label] = float(columns[(name, key)].mean())
            entry[f"{label}_ci95"] = _interval(means[:, at[(name, key)]])
        runs = [sum(record["methods"][name]["correct"]) / len(record["methods"][name]["correct"]) for record in records]
        entry["accuracy_run_range"] = [min(runs), max(runs)]
        if float(icl - zero) >= MIN_GAIN:
            entry["recovery"] = float((columns[(name, "correct")].mean() - zero) / (icl - zero))
            ratio = (means[:, at[(name, "correct")]] - means[:, at[("zero_shot", "correct")]]) / gain.clamp_min(1e-9)
            entry["recovery_ci95"] = _interval(ratio)
        else:
            entry["recovery"], entry["recovery_ci95"] = None, None
        for cost in ("seconds_to_build", "bytes_on_disk", "extra_multiply_adds_per_token"):
            values = [record["methods"][name][cost] for record in records]
            entry[cost] = None if any(v is None for v in values) else sum(values) / len(values)
        result["methods"][name] = entry
    return result


def aggregate(records: Sequence[dict], seed: int = 0) -> dict:
    """Per task and over all tasks (`pooled_metrics`), in the order tasks first appear."""
    tasks = list(dict.fromkeys(record["task"] for record in records))
    per_task = {task: pooled_metrics([r for r in records if r["task"] == task], seed) for task in tasks}
    return {"tasks": per_task, "all": pooled_metrics(records, seed)}


# --- tables ------------------------------------------------------------------------------------------------


def _cell(entry: dict, key: str, digits: int = 2) -> str:
    value, interval = entry.get(key), entry.get(f"{key}_ci95")
    if value is None:
        return "–"
    if interval is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def metric_table(aggregated: dict, key: str, methods: Sequence[str] = MAIN) -> tuple[list[str], list[list[str]]]:
    """Rows: tasks, then all tasks; columns: methods; cells "mean [low, high]"."""
    present = [m for m in methods if m in aggregated["all"]["methods"]]
    header = ["task", "queries"] + [LABELS[m] for m in present]
    rows = []
    for task, metrics in [*aggregated["tasks"].items(), ("all tasks", aggregated["all"])]:
        rows.append([task, str(metrics["n_queries"])] + [_cell(metrics["methods"][m], key) for m in present])
    return header, rows


def cost_table(aggregated: dict) -> tuple[list[str], list[list[str]]]:
    header = ["method", "seconds to build (per context)", "bytes on disk", "inference overhead per query"]
    rows = []
    for name, entry in aggregated["all"]["methods"].items():
        seconds = entry["seconds_to_build"]
        size, ops = entry["bytes_on_disk"], entry["extra_multiply_adds_per_token"]
        per = " (per query)" if name == "exact_patch" else ""
        if name == "icl":
            overhead = f"{aggregated['all']['context_tokens']:.0f} more tokens (the context)"
        elif name in ("task_vector", "task_vector_mean", "function_vector"):
            overhead = "one vector written into (TV) or added to (FV) one layer, last token"
        elif name == "zero_shot":
            overhead = "none"
        elif name == "exact_patch":
            overhead = f"a context-ful pass to build it, then {ops / 1e6:.2f} M multiply-adds per token"
        else:
            overhead = f"{ops / 1e6:.2f} M multiply-adds per token unmerged; none merged"
        rows.append(
            [
                LABELS[name],
                "–" if seconds is None or name in ("icl", "zero_shot") else f"{seconds:.1f}{per}",
                "–" if size is None else _bytes(size) + per,
                overhead,
            ]
        )
    return header, rows


def _bytes(size: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size:.0f} B"


# --- curves ------------------------------------------------------------------------------------------------


def curve_points(points: Sequence[dict], key: str, seed: int = 0) -> tuple[list[float], list[float], list[float]]:
    """Mean and bootstrap interval of a per-query score `key` at each point of a curve."""
    means, lows, highs = [], [], []
    generator = torch.Generator().manual_seed(seed)
    for point in points:
        values = torch.tensor(point[key], dtype=torch.float64)[:, None]
        resampled = _resampled_means(values, generator)[:, 0]
        means.append(float(values.mean()))
        low, high = _interval(resampled)
        lows.append(low)
        highs.append(high)
    return means, lows, highs


def plot_run_curves(out: Path, name: str, curves: dict, references: dict[str, dict[str, float]]) -> list[str]:
    """Figures of accuracy and top-1 agreement over calibration size and over rank (log₂ axes; the last rank
    point is the full-rank fit); horizontal lines: the other methods on the same queries. Returns PNG names."""
    files = []
    for axis, xlabel in (("calibration", "log₂ calibration queries"), ("rank", "log₂ rank (last point: full rank)")):
        if not curves.get(axis):
            continue
        for key, ylabel in (("correct", "first-token accuracy"), ("agree", "top-1 agreement with ICL")):
            drawn = []
            for label, points in curves[axis].items():
                x = [math.log2(point["x"]) for point in points]
                y, low, high = curve_points(points, key)
                drawn.append(Curve(label, x, y, low, high, style="o-"))
            xs = [x for curve in drawn for x in curve.x]
            for label, value in references.get(key, {}).items():
                drawn.append(Curve(label, [min(xs), max(xs)], [value, value], style="--"))
            stem = out / f"{name}_{axis}_{key}"
            plot_curves(stem, drawn, xlabel, ylabel, f"{name}: {ylabel}", ylim=(0, 1.05))
            files.append(stem.with_suffix(".png").name)
    return files


# --- the page ----------------------------------------------------------------------------------------------


def write_study_report(out: Path, result: dict, intro: str) -> Path:
    """out/metrics.json, the figures and out/index.html for a study (or one `compile` run)."""
    out = Path(out)
    write_json(out / "metrics.json", result)
    aggregated = result["aggregated"]
    tasks = list(aggregated["tasks"])
    page = Page(result.get("title", "compiled patches vs task vectors vs function vectors"))
    page.paragraph(intro)
    for key, what in (("accuracy", "first-token accuracy"), ("top1_agreement", "top-1 agreement with ICL")):
        series = []
        for name in MAIN:
            if name not in aggregated["all"]["methods"]:
                continue
            entries = [aggregated["tasks"][task]["methods"][name] for task in tasks]
            series.append(
                Bars(
                    LABELS[name],
                    [e[key] for e in entries],
                    [e[f"{key}_ci95"][0] for e in entries],
                    [e[f"{key}_ci95"][1] for e in entries],
                )
            )
        plot_bars(out / key, tasks, series, what, f"{what} per task, held-out queries")
        header, rows = metric_table(aggregated, key, list(LABELS))
        page.heading(what)
        page.table(header, rows, f"{what}, pooled held-out queries of all runs, bootstrap 95% intervals.")
        page.figure(f"{key}.png", f"{what} per task (bootstrap 95% intervals over the pooled held-out queries).")
    header, rows = metric_table(aggregated, "recovery", list(LABELS))
    page.heading("recovery of the ICL gain")
    page.table(header, rows, f"(acc − zero-shot) / (ICL − zero-shot); only where ICL beats zero-shot by ≥ {MIN_GAIN}.")
    header, rows = metric_table(aggregated, "kl_to_icl", list(LABELS))
    page.heading("KL(p_ICL ‖ p_method) at the answer position")
    page.table(header, rows, "Mean over held-out queries, in nats.")
    header, rows = cost_table(aggregated)
    page.heading("cost")
    page.table(
        header,
        rows,
        "Means over runs. Compiled patches, task and function vectors include the context-ful recording of the calibration queries they need.",
    )
    for figure in result.get("curve_figures", []):
        page.figure(
            figure, figure.removesuffix(".png").replace("_", " ") + " (bootstrap 95% intervals over held-out queries)."
        )
    page.heading("choices made on dev queries, per run")
    page.table(
        ["task", "context", "seed", "compiled", "calibration", "bias-only", "TV layer", "FV layer", "FV heads"],
        [
            [
                r["task"],
                r["context"],
                r["seed"],
                r["choices"].get("compiled", "–"),
                r["choices"].get("compiled_calibration_queries", "–"),
                r["choices"].get("compiled_bias", "–"),
                r["choices"].get("task_vector_layer", "–"),
                r["choices"].get("function_vector_layer", "–"),
                len(r["choices"].get("function_vector_heads", [])),
            ]
            for r in result["runs"]
        ],
        "What dev selected in each run (layers count from 0; a vector at layer L enters layer L).",
    )
    return page.write(out)
