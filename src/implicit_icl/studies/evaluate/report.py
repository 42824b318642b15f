"""The evaluation's table (terminal and Markdown) and its report folder: metrics.json, table.md, the accuracy
figure and index.html."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from implicit_icl.atomic import write_atomically
from implicit_icl.report import write_json
from implicit_icl.report.pages import Bars, Page, markdown, plot_bars
from implicit_icl.studies.evaluate.metrics import STRONG_GAIN


def interval(metrics: dict, key: str) -> str:
    low, high = metrics[f"{key}_ci95"]
    return f"{metrics[key]:.2f} [{low:.2f}, {high:.2f}]"


def task_rows(result: dict) -> tuple[list[str], list[list[object]]]:
    """The table of tasks, for the terminal and the HTML report."""
    header = ["task", "kind", "zero-shot", "ICL", "patched", "patched = ICL top-1", "max |Δlogit|"]
    whole = result["whole_answers"]
    if whole:
        header += ["whole answer: zero-shot", "whole: ICL", "whole: patched"]
    rows = []
    for metrics in result["tasks"]:
        row = [metrics["task"], metrics["kind"]]
        row += [interval(metrics, f"{side}_accuracy") for side in ("zero_shot", "icl", "patched")]
        row += [f"{metrics['patched_agreement']:.3f}", f"{metrics['max_abs_logit_diff']:.1e}"]
        if whole:
            row += [f"{metrics[f'whole_answer_{side}_accuracy']:.2f}" for side in ("zero_shot", "icl", "patched")]
        rows.append(row)
    return header, rows


def print_evaluation(console: Console, result: dict) -> None:
    """The table of tasks; piped output gets a wide table instead of rich's 80 columns."""
    wide = console if console.is_terminal else Console(file=console.file, width=170)
    wide.print(settings_line(result), markup=False)  # a line above the table: as a title rich would centre and wrap it
    wide.print(evaluation_table(result))


def evaluation_table(result: dict) -> Table:
    header, rows = task_rows(result)
    table = Table()
    for index, column in enumerate(header):
        table.add_column(column, justify="left" if index < 2 else "right")
    for row in rows:
        table.add_row(*(str(value) for value in row))
    return table


def settings_line(result: dict) -> str:
    return (
        f"{result['model']} ({result['model_dtype']}, patch arithmetic {result['patch_arithmetic']}): "
        f"first-token accuracy [bootstrap 95%], {result['n']} prompts per task, {result['shots']} shots, "
        f"seed {result['seed']}"
    )


def markdown_table(result: dict) -> str:
    """The table of tasks in Markdown (for a README or a model card), headed by the settings."""
    return f"{settings_line(result)}.\n\n" + markdown(*task_rows(result)) + "\n"


def write_evaluation_report(out: Path, result: dict) -> Path:
    """out/metrics.json, out/table.md, out/accuracy.png|svg and out/index.html."""
    write_json(out / "metrics.json", result)
    write_atomically(out / "table.md", lambda temporary: temporary.write_text(markdown_table(result)))
    tasks = result["tasks"]
    series = [
        Bars(
            label,
            [t[f"{side}_accuracy"] for t in tasks],
            [t[f"{side}_accuracy_ci95"][0] for t in tasks],
            [t[f"{side}_accuracy_ci95"][1] for t in tasks],
        )
        for label, side in (("zero-shot", "zero_shot"), ("ICL", "icl"), ("patched, no context", "patched"))
    ]
    title = f"accuracy per task ({result['n']} prompts, {result['shots']} shots, seed {result['seed']})"
    plot_bars(out / "accuracy", [t["task"] for t in tasks], series, "first-token accuracy", title)
    summary = result["summary"]
    page = Page(f"implicit-icl evaluate: {result['model']}")
    page.paragraph(
        f"{settings_line(result)}. Prompt template: {result['template']}. Zero-shot: the query alone. ICL: the "
        "demonstrations, then the query. Patched: the query alone at its original positions, under the exact "
        "weight patch computed from its own demonstrations (no context in the input)."
    )
    page.paragraph(
        f"Tasks where ICL beats zero-shot by ≥ {STRONG_GAIN}: {summary[f'n_tasks_icl_gain_at_least_{STRONG_GAIN}']} "
        f"of {summary['n_tasks']}. Patched top-1 = ICL top-1 on {summary['patched_agreement_overall']:.4f} of all "
        f"prompts; largest |patched − ICL| logit difference {summary['max_abs_logit_diff_overall']:.2e}."
    )
    header, rows = task_rows(result)
    page.table(header, rows, f"Per task, {result['n']} prompts each: accuracy with bootstrap 95% intervals.")
    page.figure("accuracy.png", f"First-token accuracy per task ({result['n']} prompts each), bootstrap 95% intervals.")
    disagreeing = [(t["task"], d) for t in tasks for d in t["disagreements"]]
    if disagreeing:
        page.table(
            ["task", "query", "ICL top-1", "patched top-1", "ICL top-2 margin", "max |Δlogit|"],
            [
                [
                    name,
                    d["input"],
                    repr(d["icl_token"]),
                    repr(d["patched_token"]),
                    d["icl_top2_margin"],
                    d["max_abs_logit_diff"],
                ]
                for name, d in disagreeing
            ],
            "Prompts where the patched top-1 token differs from ICL's, with ICL's top-1 minus top-2 logit.",
        )
    page.table(
        ["task", "query", "expected", "zero-shot", "ICL", "patched"],
        [[t["task"], *e.values()] for t in tasks for e in t["examples"]],
        "The first prompts of each task and each side's greedy answer.",
    )
    return page.write(out)
