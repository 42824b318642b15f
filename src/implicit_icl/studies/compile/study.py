"""The compile study over many runs: tasks × demonstration sets × seeds, every run saved as it finishes (a
rerun skips finished runs), then pooled (`compile_report.aggregate`) into index.html, metrics.json, figures
and README-ready markdown tables.

Three parts (scripts/compile_study.py drives them):
- pilot: the compiled patch alone on tasks kept out of the comparison, over a wide grid, to fix its default
  settings before the comparison is run;
- comparison: every method on every run (default and dev-chosen compiled patches, the bias-only one, the two
  ablations, task vectors, function vectors, exact patches, zero-shot, ICL);
- curves: one run per task with curves over calibration size and rank.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from implicit_icl.models.load import LoadedModel
from implicit_icl.report import write_json
from implicit_icl.report.pages import markdown
from implicit_icl.studies.compile.methods import CurveSettings, StudySettings, run_split
from implicit_icl.studies.compile.report import (
    LABELS,
    MAIN,
    aggregate,
    cost_table,
    metric_table,
    plot_run_curves,
    reference_lines,
    run_record,
    write_study_report,
)
from implicit_icl.studies.compile.splits import encode_split, split_task
from implicit_icl.tasks import task


def run_file(out: Path, name: str, context: int, seed: int) -> Path:
    return Path(out) / "runs" / f"{name}_context{context}_seed{seed}.json"


def run_many(
    loaded: LoadedModel,
    tasks: Sequence[str],
    contexts: Sequence[int],
    seeds: Sequence[int],
    settings: StudySettings,
    out: Path,
    curves: CurveSettings | None = None,
    log=print,
) -> list[dict]:
    """Every (task, context, seed) run, each saved to out/runs/ when done; finished runs are read back."""
    records = []
    for name in tasks:
        for context in contexts:
            for seed in seeds:
                path = run_file(out, name, context, seed)
                if path.is_file():
                    records.append(json.loads(path.read_text()))
                    continue
                start = time.perf_counter()
                split = split_task(
                    task(name), settings.shots, settings.calibration, settings.dev, settings.n, context, seed
                )
                encoded = encode_split(loaded.tokenizer, split, seed)
                run = run_split(loaded.model, encoded, settings, lambda what: None, curves)
                record = run_record(name, context, seed, run)
                record["seconds"] = time.perf_counter() - start
                record["shrunk"] = split.shrunk
                write_json(path, record)
                records.append(record)
                accuracy = {m: round(record["methods"][m]["accuracy"], 2) for m in MAIN if m in record["methods"]}
                log(f"{name} context {context} seed {seed}: {record['seconds']:.0f} s {accuracy}")
    return records


def pilot_table(records: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Held-out accuracy, agreement and KL of every searched setting, averaged over the pilot's runs."""
    rows: dict[str, list[dict]] = {}
    for record in records:
        for row in record["choices"]["search"]:
            if row["calibration_queries"] == record["sizes"]["calibration_size"]:
                rows.setdefault(row["settings"], []).append(row)
    header = ["settings", "runs", "held-out accuracy", "top-1 agreement", "KL to ICL", "fit seconds"]
    table = []
    for label, items in rows.items():
        mean = {
            key: sum(item[key] for item in items) / len(items)
            for key in items[0]
            if key.startswith(("heldout", "seconds"))
        }
        table.append(
            [
                label,
                str(len(items)),
                f"{mean['heldout_accuracy']:.3f}",
                f"{mean['heldout_top1_agreement']:.3f}",
                f"{mean['heldout_kl_to_icl']:.3f}",
                f"{mean['seconds']:.1f}",
            ]
        )
    return header, table


def write_comparison(out: Path, records: list[dict], intro: str, curve_records: Sequence[dict] = ()) -> dict:
    """The pooled result, its report and the markdown tables (out/tables.md)."""
    aggregated = aggregate(records)
    figures = []
    for record in curve_records:
        references = reference_lines(aggregate([record])["all"]["methods"])
        figures += plot_run_curves(Path(out), record["task"], record["curves"], references)
    result = dict(aggregated=aggregated, runs=records, curve_figures=figures, curve_runs=list(curve_records))
    write_study_report(out, result, intro)
    sections = []
    for key, title in (
        ("accuracy", "First-token accuracy"),
        ("top1_agreement", "Top-1 agreement with ICL"),
        ("recovery", "Recovery (acc − zero-shot) / (ICL − zero-shot)"),
        ("kl_to_icl", "KL(p_ICL ‖ p_method), nats"),
    ):
        sections.append(f"### {title}\n\n" + markdown(*metric_table(aggregated, key, list(LABELS))))
    sections.append("### Cost\n\n" + markdown(*cost_table(aggregated)))
    (Path(out) / "tables.md").write_text("\n\n".join(sections) + "\n")
    return result
