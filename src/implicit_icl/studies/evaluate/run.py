"""`implicit-icl evaluate`: tasks by name or file, prompts, the model, scores per task, JSON and a report.

Everything about the user's input (task names, task files, shots against pool sizes, n) is checked before the
model loads, each failure one ImplicitICLError line.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from implicit_icl.errors import ImplicitICLError
from implicit_icl.models.load import LoadedModel, load_model
from implicit_icl.progress import progress_bar
from implicit_icl.report.pages import check_out_folder
from implicit_icl.studies.evaluate.metrics import suite_summary, task_metrics
from implicit_icl.studies.evaluate.report import write_evaluation_report
from implicit_icl.studies.evaluate.scores import EvaluationSettings, score_task, task_prompts
from implicit_icl.tasks import TASKS, Prompt, Task, load_task_file, task
from implicit_icl.tasks.template import DEMONSTRATION, QUERY

ALL = "all"
TEMPLATE = f"{DEMONSTRATION!r} per demonstration, then {QUERY!r}; scored: the first token of ' ' + output"


def resolve_tasks(names: Sequence[str], files: Sequence[Path], shots: int) -> list[Task]:
    """Built-in tasks by name ("all" for every one), then one task per file, each at most once."""
    if not names and not files:
        raise ImplicitICLError(f"give at least one --task NAME (or --task {ALL}) or --task-file FILE")
    tasks: dict[str, Task] = {}
    chosen = [t for name in names for t in (TASKS.values() if name == ALL else [task(name)])]
    for item in chosen + [load_task_file(path, shots=shots) for path in files]:
        if item.name in tasks and tasks[item.name] is not item:
            raise ImplicitICLError(
                f"two tasks are called {item.name!r} (a task file's name is its file's stem); rename the file"
            )
        tasks[item.name] = item
    return list(tasks.values())


def arithmetic_of(loaded: LoadedModel) -> torch.dtype:
    """The patch's arithmetic: the model's own float32 or float64 (float32 for a bfloat16 model)."""
    return torch.float64 if loaded.model.dtype == torch.float64 else torch.float32


def evaluate_prompts(
    loaded: LoadedModel, prompts: dict[str, tuple[Task, list[Prompt]]], settings: EvaluationSettings
) -> list[dict]:
    """Every task's metrics, with a progress bar over its prompts on stderr."""
    if loaded.tokenizer is None:
        raise ImplicitICLError(f"{loaded.name} has no tokenizer; task prompts are text, so evaluate needs one")
    results = []
    with progress_bar() as bar:
        for name, (item, task_prompts_) in prompts.items():
            bar_task = bar.add_task(f"evaluate {name}", total=len(task_prompts_))
            start = time.perf_counter()
            scores = score_task(
                loaded.model,
                loaded.tokenizer,
                task_prompts_,
                settings,
                arithmetic_of(loaded),
                progress=lambda done, t=bar_task: bar.advance(t, done),
            )
            seconds = time.perf_counter() - start
            results.append(task_metrics(item, task_prompts_, scores, loaded.tokenizer, settings, seconds))
            bar.remove_task(bar_task)
    return results


def run_evaluation(
    model: str | None,
    dtype: str,
    names: Sequence[str],
    files: Sequence[Path],
    settings: EvaluationSettings,
    out: Path | None = None,
    loaded: LoadedModel | None = None,
) -> dict:
    """The whole command: JSON-ready result (and out/index.html, out/metrics.json, the figure when out)."""
    if out is not None:
        check_out_folder(out)
    tasks = resolve_tasks(names, files, settings.shots)
    prompts = {item.name: (item, task_prompts(item, settings)) for item in tasks}  # checks shots first
    start = time.perf_counter()
    loaded = loaded or load_model(model, dtype)
    results = evaluate_prompts(loaded, prompts, settings)
    result = {
        "model": loaded.name,
        "model_dtype": str(loaded.model.dtype).removeprefix("torch."),
        "patch_arithmetic": str(arithmetic_of(loaded)).removeprefix("torch."),
        "shots": settings.shots,
        "n": settings.n,
        "seed": settings.seed,
        "template": TEMPLATE,
        "whole_answers": settings.whole_answers,
        "summary": suite_summary(results),
        "tasks": results,
        "seconds": time.perf_counter() - start,
    }
    if out is not None:
        write_evaluation_report(Path(out), result)
    return result
