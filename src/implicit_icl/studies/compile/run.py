"""`implicit-icl compile`: one context compiled into one patch, measured against every other method, exported.

Input, exactly one of:
- a built-in task (`--task`) or a task file (`--task-file`): the K demonstrations form the context; calibration,
  dev and held-out queries are disjoint inputs of the task (`compile_splits.split_task`);
- a context (`--context TEXT`, `--context-file F` or `--context-ids "1 2 3"`) with a calibration file (`--calibration FILE`): a JSON
  list of queries, each a string (the text that follows the context), a list of token ids, or an object
  {"query": ..., "answer": ...} whose answer is the continuation (text whose first token is scored, or a
  token id). Its items are split into dev, held-out and calibration queries like a task's. Without answers
  ICL's top-1 token is the label. The function vector needs demonstrations to shuffle: a context in the
  task template ("Q: ...\\nA: ...\\n\\n" per demonstration); otherwise it is left out (null).
Everything about the input is checked before the model loads; bad input is one ImplicitICLError line.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from implicit_icl.engine.inputs import as_token_ids
from implicit_icl.engine.merge import save_merged
from implicit_icl.errors import ImplicitICLError
from implicit_icl.models.load import LoadedModel, load_model
from implicit_icl.models.options import parse_ids
from implicit_icl.progress import progress_bar
from implicit_icl.studies.compile.methods import CurveSettings, StudySettings
from implicit_icl.studies.compile.methods import run_split as run_methods
from implicit_icl.studies.compile.report import (
    aggregate,
    plot_run_curves,
    reference_lines,
    run_record,
    write_study_report,
)
from implicit_icl.studies.compile.splits import Encoded, encode_split, shuffled_labels, split_sizes, split_task
from implicit_icl.tasks import Task, format_context, load_task_file, parse_context, task
from implicit_icl.tasks.encoding import split_ids, token_ids

CONTRACT = {  # JSON key -> (method, metric) of the pooled metrics
    "compiled_accuracy": ("compiled", "accuracy"),
    "icl_accuracy": ("icl", "accuracy"),
    "zero_shot_accuracy": ("zero_shot", "accuracy"),
    "task_vector_accuracy": ("task_vector", "accuracy"),
    "function_vector_accuracy": ("function_vector", "accuracy"),
    "exact_patch_accuracy": ("exact_patch", "accuracy"),
    "compiled_default_accuracy": ("compiled_default", "accuracy"),
    "compiled_bias_accuracy": ("compiled_bias", "accuracy"),
    "task_vector_mean_accuracy": ("task_vector_mean", "accuracy"),
    "heldout_top1_agreement": ("compiled", "top1_agreement"),
    "baseline_top1_agreement": ("zero_shot", "top1_agreement"),
    "kl_to_icl": ("compiled", "kl_to_icl"),
    "baseline_kl_to_icl": ("zero_shot", "kl_to_icl"),
    "recovery": ("compiled", "recovery"),
}


@dataclass(frozen=True)
class Source:
    """Where the context and the queries come from: a task, or a context with a calibration file."""

    task: str | None = None
    task_file: Path | None = None
    context: str | None = None
    context_ids: str | None = None
    calibration: Path | None = None
    context_file: Path | None = None

    def __post_init__(self) -> None:
        if self.context_file is not None:  # read here, so that the rest sees one text (a shell's $(cat) drops "\n\n")
            if self.context is not None:
                raise ImplicitICLError("give --context or --context-file, not both")
            try:
                object.__setattr__(self, "context", Path(self.context_file).read_text(encoding="utf-8"))
            except OSError as error:
                raise ImplicitICLError(f"cannot read --context-file {self.context_file}: {error.strerror}") from None

    def check(self, shots: int) -> Task | list:
        """The task, or the calibration file's items; one-line errors for anything else."""
        given = [name for name in ("task", "task_file", "context", "context_ids") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ImplicitICLError(
                f"give exactly one of --task, --task-file, --context (--context-file) or --context-ids (got {len(given)})"
            )
        if self.task is not None or self.task_file is not None:
            if self.calibration is not None:
                raise ImplicitICLError("--calibration goes with --context/--context-ids; a task draws its own queries")
            return task(self.task) if self.task is not None else load_task_file(self.task_file, shots=shots)
        if self.calibration is None:
            raise ImplicitICLError("a --context needs --calibration FILE: a JSON list of queries to fit on")
        return read_calibration(self.calibration)


def read_calibration(path: Path) -> list:
    try:
        items = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ImplicitICLError(f"cannot read --calibration {path}: {error.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ImplicitICLError(f"--calibration {path} is not JSON: {str(error).splitlines()[0]}") from None
    if not isinstance(items, list) or len(items) < 3:
        raise ImplicitICLError(
            f"--calibration {path} must hold a JSON list of at least 3 queries (dev, held-out, calibration)"
        )
    for index, item in enumerate(items):
        query = item.get("query") if isinstance(item, dict) else item
        if not (isinstance(query, str) and query) and not (
            isinstance(query, list) and query and all(isinstance(i, int) for i in query)
        ):
            raise ImplicitICLError(
                f"--calibration {path}: item {index} is not a query (a non-empty string, a list of token ids, or "
                '{"query": ..., "answer": ...})'
            )
    labelled = {isinstance(item, dict) and "answer" in item for item in items}
    if len(labelled) > 1:
        raise ImplicitICLError(f"--calibration {path}: give an answer for every query or for none")
    return items


def encode_items(loaded: LoadedModel, source: Source, items: list, settings: StudySettings) -> Encoded:
    """The ids of a free context and of its calibration file's queries, split into dev / held-out / calibration."""
    tokenizer = loaded.tokenizer
    items = list(items)
    random.Random(f"compile:calibration:{settings.seed}").shuffle(items)
    n_dev, n_heldout, n_calibration = split_sizes(len(items), settings.calibration, settings.dev, settings.n)
    if min(n_dev, n_heldout, n_calibration) < 1:
        raise ImplicitICLError(f"{len(items)} queries are too few for ≥ 1 dev, held-out and calibration query each")

    def need_tokenizer(what: str):
        if tokenizer is None:
            raise ImplicitICLError(f"{loaded.name} has no tokenizer; give {what} as token ids")

    if source.context_ids is not None:
        context = parse_ids(source.context_ids, "--context-ids")
    else:
        need_tokenizer("the context")
        context = None

    def query_ids(query) -> torch.Tensor:
        nonlocal context
        if isinstance(query, list):
            return torch.tensor(query, dtype=torch.long)
        need_tokenizer("the queries")
        if source.context is None:
            return torch.tensor(token_ids(tokenizer, query))
        before, alone = split_ids(tokenizer, source.context, query)
        ids = torch.tensor(before)
        if context is None:
            context = ids
        elif not torch.equal(context, ids):
            raise ImplicitICLError("the tokenizer reads the context differently before different queries")
        return torch.tensor(alone)

    def answer_id(answer) -> int:
        if isinstance(answer, int):
            return answer
        need_tokenizer("the answers")
        ids = token_ids(tokenizer, answer)
        if not ids:
            raise ImplicitICLError(f"answer {answer!r} has no tokens")
        return ids[0]

    queries = [query_ids(_query_text(item)) for item in items]
    if context is None:  # a text context is cut off text queries (split_ids); ids give no place to cut
        raise ImplicitICLError("a text context needs text calibration queries; give the queries as text")
    context = as_token_ids("the context", context, loaded.model)
    queries = [as_token_ids("a calibration query", ids, loaded.model) for ids in queries]
    labelled = isinstance(items[0], dict) and "answer" in items[0]
    answers = torch.tensor([answer_id(item["answer"]) for item in items]) if labelled else None
    dev, heldout = slice(0, n_dev), slice(n_dev, n_dev + n_heldout)
    calibration = slice(n_dev + n_heldout, n_dev + n_heldout + n_calibration)
    return Encoded(
        context,
        _shuffled_context(tokenizer, source.context, settings.seed, _query_text(items[0])),
        queries[calibration],
        queries[dev],
        queries[heldout],
        None if answers is None else answers[dev],
        None if answers is None else answers[heldout],
    )


def _query_text(item) -> str | list[int]:
    return item["query"] if isinstance(item, dict) else item


def _shuffled_context(tokenizer, text: str | None, seed: int, query: str | list[int]) -> torch.Tensor | None:
    """The context with its demonstrations' answers permuted, when it is in the task template; tokenized with
    a query after it, as the context itself is (`split_ids`)."""
    if text is None or tokenizer is None or not isinstance(query, str):
        return None
    try:
        demonstrations = parse_context(text)
    except ImplicitICLError:
        return None
    if len(demonstrations) < 2:
        return None
    return torch.tensor(split_ids(tokenizer, format_context(shuffled_labels(demonstrations, seed)), query)[0])


def compile_command(
    model: str | None,
    dtype: str,
    source: Source,
    settings: StudySettings,
    save: Path | None = None,
    peft: Path | None = None,
    merged: Path | None = None,
    out: Path | None = None,
    loaded: LoadedModel | None = None,
) -> dict:
    """The whole command: the JSON-ready result; the exports and the report when asked."""
    checked = source.check(settings.shots)
    split = None
    if isinstance(checked, Task):
        split = split_task(
            checked, settings.shots, settings.calibration, settings.dev, settings.n, settings.seed, settings.seed
        )
    start = time.perf_counter()
    loaded = loaded or load_model(model, dtype)
    encoded = (
        encode_split(loaded.tokenizer, split, settings.seed)
        if split
        else encode_items(loaded, source, checked, settings)
    )
    curves = CurveSettings(sizes=(1, 2, 4, 8, 16, 32, 64), ranks=(1, 4, 16, 64)) if out is not None else None
    with progress_bar() as bar:
        job = bar.add_task("compile", total=None)
        run = run_methods(loaded.model, encoded, settings, lambda what: bar.update(job, description=what), curves)
    name = split.task if split else "context"
    record = run_record(name, settings.seed, settings.seed, run)
    aggregated = aggregate([record], settings.seed)
    pooled = aggregated["all"]["methods"]
    result = dict(model=loaded.name, task=name, shots=settings.shots if split else None, seed=settings.seed)
    for key, (method, metric) in CONTRACT.items():
        entry = pooled.get(method)
        result[key] = None if entry is None else entry[metric]
        if entry is not None and entry.get(f"{metric}_ci95") is not None:
            result[f"{key}_ci95"] = entry[f"{metric}_ci95"]
    sizes = {key: value for key, value in run["sizes"].items() if key != "icl_top2_margin"}
    result.update(sizes, shrunk=split.shrunk if split else None, choices=run["choices"], methods=pooled)
    if encoded.shuffled_context_ids is None:
        result["notes"] = "no function vector: the context is not in the task template, so no labels can be shuffled"
    patch = run["methods"]["compiled"].patch
    if save is not None:
        patch.save(save)
    if peft is not None:
        patch.to_peft(peft, loaded.model)
    if merged is not None:
        save_merged(loaded.model, patch, merged, loaded.tokenizer)
    result.update(saved_to=_text(save), peft_adapter=_text(peft), merged_checkpoint=_text(merged))
    result["seconds"] = time.perf_counter() - start
    if out is not None:
        _report(Path(out), result, record, aggregated, loaded.name)
        result["report"] = str(Path(out) / "index.html")
    return result


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _report(out: Path, result: dict, record: dict, aggregated: dict, model: str) -> None:
    references = reference_lines(aggregated["all"]["methods"])
    figures = plot_run_curves(out, result["task"], record.get("curves", {}), references)
    intro = (
        f"{model}: the context ({result['context_tokens']} tokens) compiled into one patch from "
        f"{result['calibration_size']} calibration queries, next to zero-shot, ICL, the exact per-query patch, "
        f"task vectors and function vectors, on {result['n_heldout']} held-out queries (dev: {result['dev_size']}; "
        f"labels: {result['labels']}). Compiled settings chosen on dev: {result['choices'].get('compiled')}."
    )
    write_study_report(out, dict(aggregated=aggregated, runs=[record], curve_figures=figures, result=result), intro)
