"""A stated counterfactual compiled into a weight edit, measured like a model edit (docs/experiments.md §7).

For each fact of `studies.facts`: the context is the statement alone ("The Eiffel Tower is in Rome."), asked
about in the task template ("Q: In which city is the Eiffel Tower?\\nA:"). The compiled patch is fitted on
unlabelled calibration queries: the fact's own question, two more phrasings of it (never scored) and the
other facts' own questions (unrelated subjects, whose context-ful answers the fit should keep);
paraphrases and neighbours are never fitted.
Scored on the first token of " " + answer, per prompt (CounterFact's metrics, Meng et al. 2022):
- efficacy: on the fact's own question, p(new) > p(true);
- generalisation: on its three paraphrases, p(new) > p(true);
- specificity: on three questions about other subjects, p(their true answer) > p(new).
Methods: the unedited model (no context), ICL (the statement, then the question), the compiled patch
(default settings, and the bias-only variant where no norm follows the MLP: behind one a bias is no steering
vector), and the exact per-query patch (equal to ICL: a check).
Intervals: bootstrap 95% over the prompts of all facts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from implicit_icl.analyses.compile import bias_steers, fit_patch, record_calibration
from implicit_icl.engine.construct import compute_patches
from implicit_icl.engine.queries import context_logits, reduced_logits
from implicit_icl.errors import ImplicitICLError
from implicit_icl.models.load import LoadedModel
from implicit_icl.progress import progress_bar
from implicit_icl.report import write_json
from implicit_icl.report.pages import Page, markdown
from implicit_icl.statistics import N_RESAMPLES, bootstrap
from implicit_icl.studies.compile.methods import BIAS_SEARCH, DEFAULT
from implicit_icl.studies.editing.facts import FACTS, Fact
from implicit_icl.tasks import format_query
from implicit_icl.tasks.encoding import split_ids, token_ids

METHODS = {
    "unedited": "unedited (no context)",
    "icl": "ICL (statement in context)",
    "compiled": f"compiled patch ({DEFAULT.label})",
    "compiled_bias": f"compiled, bias only ({BIAS_SEARCH[1].label})",
    "exact_patch": "exact per-query patch",
}
METRICS = ("efficacy", "generalisation", "specificity")


@dataclass(frozen=True)
class EncodedFact:
    """Ids of one fact: the context, its 7 queries (own question, 3 paraphrases, 3 neighbours), and per query
    the token the edit wants (new) and the one it competes with (true), both first tokens of " " + answer;
    phrasings: the calibration-only ways to ask."""

    context_ids: Tensor
    queries: list[Tensor]
    phrasings: list[Tensor]
    wanted: Tensor  # [7]: new, new ×3, neighbour's true ×3
    rival: Tensor  # [7]: true, true ×3, new ×3


def _first_token(tokenizer, answer: str) -> int:
    return token_ids(tokenizer, " " + answer)[0]


def encode_fact(tokenizer, fact: Fact) -> EncodedFact:
    context_text = fact.statement + "\n\n"
    questions = [fact.question, *fact.paraphrases, *(question for question, _ in fact.neighbours), *fact.phrasings]
    context, queries = None, []
    for question in questions:
        before, query = split_ids(tokenizer, context_text, format_query(question))
        if context is not None and before != context:
            raise ImplicitICLError(
                f"the tokenizer reads the statement {fact.statement!r} differently before its questions"
            )
        context = before
        queries.append(torch.tensor(query))
    new, true = _first_token(tokenizer, fact.new), _first_token(tokenizer, fact.true)
    if new == true:
        raise ImplicitICLError(f"{fact.new!r} and {fact.true!r} start with the same token; rephrase the fact")
    neighbours = [_first_token(tokenizer, answer) for _, answer in fact.neighbours]
    wanted = torch.tensor([new] * 4 + neighbours)
    rival = torch.tensor([true] * 4 + [new] * 3)
    return EncodedFact(torch.tensor(context), queries[:7], queries[7:], wanted, rival)


def _successes(logits: Tensor, fact: EncodedFact) -> Tensor:
    """[7] bool: the wanted token beats its rival."""
    rows = torch.arange(len(fact.queries))
    return logits[rows, fact.wanted] > logits[rows, fact.rival]


def edit_fact(loaded: LoadedModel, facts: list[EncodedFact], index: int) -> dict[str, Tensor | float]:
    """Every method on fact `index`; calibration: its own question and phrasings, the other facts' questions."""
    model, fact = loaded.model, facts[index]
    offset = fact.context_ids.numel()
    calibration = [fact.queries[0], *fact.phrasings] + [other.queries[0] for i, other in enumerate(facts) if i != index]
    results: dict[str, Tensor | float] = {}
    results["unedited"] = _successes(reduced_logits(model, fact.queries, offset), fact)
    results["icl"] = _successes(context_logits(model, fact.context_ids, fact.queries), fact)
    start = time.perf_counter()
    recorded = record_calibration(model, fact.context_ids, calibration)  # one context-ful pass serves both fits
    record_seconds = time.perf_counter() - start
    fits = [("compiled", DEFAULT)]
    if bias_steers(model):
        fits.append(("compiled_bias", BIAS_SEARCH[1]))
    for name, settings in fits:
        start = time.perf_counter()
        patch = fit_patch(model, recorded, settings)
        results[f"{name}_seconds"] = record_seconds + time.perf_counter() - start
        with patch.applied(model):
            results[name] = _successes(reduced_logits(model, fact.queries, offset), fact)
    exact = compute_patches(model, [(fact.context_ids, query) for query in fact.queries], dtype=torch.float32)
    with exact.applied(model):
        results["exact_patch"] = _successes(
            reduced_logits(model, fact.queries, offset, batch_size=len(fact.queries)), fact
        )
    return results


def run_editing(loaded: LoadedModel, out: Path | None = None, facts=FACTS, seed: int = 0) -> dict:
    """The editing measurement over `facts`: per method efficacy, generalisation and specificity with
    bootstrap intervals; writes out/metrics.json and out/index.html when `out`."""
    if loaded.tokenizer is None:
        raise ImplicitICLError("the facts are text, so the model needs a tokenizer")
    encoded = [encode_fact(loaded.tokenizer, fact) for fact in facts]
    per_fact = _edit_every_fact(loaded, encoded)
    methods = {name: label for name, label in METHODS.items() if name in per_fact[0]}
    parts = {"efficacy": slice(0, 1), "generalisation": slice(1, 4), "specificity": slice(4, 7)}
    metrics = {}
    for name in methods:
        entry = {}
        for metric, part in parts.items():
            values = torch.cat([result[name][part] for result in per_fact]).double()
            estimate = bootstrap(values, torch.Generator().manual_seed(seed), N_RESAMPLES)
            entry[metric] = float(estimate.mean[0])
            entry[f"{metric}_ci95"] = [float(estimate.low[0]), float(estimate.high[0])]
            entry[f"{metric}_prompts"] = values.numel()
        if f"{name}_seconds" in per_fact[0]:
            entry["seconds_to_build"] = sum(result[f"{name}_seconds"] for result in per_fact) / len(per_fact)
        metrics[name] = entry
    header = ["method"] + list(METRICS)
    rows = [
        [label]
        + [
            f"{metrics[name][m]:.2f} [{metrics[name][m + '_ci95'][0]:.2f}, {metrics[name][m + '_ci95'][1]:.2f}]"
            for m in METRICS
        ]
        for name, label in methods.items()
    ]
    table = markdown(header, rows)
    per_fact_rows = [
        dict(statement=fact.statement, **{name: result[name].int().tolist() for name in methods})
        for fact, result in zip(facts, per_fact, strict=True)
    ]
    result = dict(n_facts=len(facts), metrics=metrics, table=table, facts=per_fact_rows)
    if out is not None:
        _write(Path(out), result, loaded.name, rows)
    return result


def _edit_every_fact(loaded: LoadedModel, encoded: list[EncodedFact]) -> list[dict[str, Tensor | float]]:
    per_fact = []
    with progress_bar() as bar:
        task = bar.add_task("facts", total=len(encoded))
        for index in range(len(encoded)):
            per_fact.append(edit_fact(loaded, encoded, index))
            bar.advance(task)
    return per_fact


def _write(out: Path, result: dict, model: str, rows: list[list[str]]) -> None:
    write_json(out / "metrics.json", result)
    methods = list(result["metrics"])
    page = Page(f"context as a model edit: {model}")
    page.paragraph(
        f"{result['n_facts']} counterfactual statements, each the whole context, compiled into one patch from "
        "calibration queries (the fact's own question, two more phrasings of it, the other facts' questions); "
        "paraphrases and neighbour "
        "questions are never fitted. Efficacy: p(new) > p(true) on the own question; generalisation: the same on "
        "3 paraphrases; specificity: p(true answer) > p(new) on 3 questions about other subjects. First tokens "
        "of ' ' + answer; bootstrap 95% intervals over prompts."
    )
    page.table(["method", *METRICS], rows, "Share of prompts where the edit's wanted token beats its rival.")
    page.table(
        ["statement", *methods],
        [[row["statement"]] + ["".join(map(str, row[name])) for name in methods] for row in result["facts"]],
        "Per fact: own question, 3 paraphrases, 3 neighbours (1 = the wanted token wins).",
    )
    page.write(out)
