"""From one task's per-prompt scores to its metrics: accuracies with bootstrap 95% intervals, the patch's
agreement with ICL, and every prompt where the patched top-1 token differs, with ICL's top-2 margin there."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from implicit_icl.statistics import N_RESAMPLES, bootstrap
from implicit_icl.studies.evaluate.scores import EvaluationSettings, Scores
from implicit_icl.tasks import Prompt, Task, completed_answer, whole_answer_correct

STRONG_GAIN = 0.3  # ICL − zero-shot first-token accuracy that counts as a strong in-context effect
SIDES = ("zero_shot", "icl", "patched")
N_EXAMPLES = 3  # prompts shown with their answers in the report


def with_intervals(prefix: str, columns: dict[str, Tensor], seed: int) -> dict:
    """Means and bootstrap 95% intervals of per-prompt columns [N], resampled together (paired), so equal
    columns get equal intervals and differences of columns get their paired interval."""
    names = list(columns)
    estimate = bootstrap(
        torch.stack([columns[name].double() for name in names], 1), torch.Generator().manual_seed(seed), N_RESAMPLES
    )
    metrics = {}
    for index, name in enumerate(names):
        metrics[f"{prefix}{name}"] = float(estimate.mean[index])
        metrics[f"{prefix}{name}_ci95"] = [float(estimate.low[index]), float(estimate.high[index])]
    return metrics


def first_token_metrics(scores: Scores, seed: int) -> dict:
    answer = torch.tensor(scores.answer_token)
    correct = {side: torch.tensor(getattr(scores, f"{side}_top")) == answer for side in SIDES}
    columns = {f"{side}_accuracy": correct[side] for side in SIDES}
    columns["icl_minus_zero_shot"] = correct["icl"].double() - correct["zero_shot"].double()
    agree = torch.tensor(scores.patched_top) == torch.tensor(scores.icl_top)
    return {
        **with_intervals("", columns, seed),
        "patched_agreement": float(agree.double().mean()),
        "max_abs_logit_diff": max(scores.max_abs_logit_diff),
        "min_icl_margin": min(scores.icl_margin),
    }


def whole_answer_metrics(
    scores: Scores, prompts: Sequence[Prompt], tokenizer: PreTrainedTokenizerBase, seed: int
) -> dict:
    texts = {
        side: [tokenizer.decode(t, skip_special_tokens=True) for t in getattr(scores, f"{side}_answer")]
        for side in SIDES
    }
    outputs = [prompt.query.output for prompt in prompts]
    columns = {
        f"{side}_accuracy": torch.tensor(
            [whole_answer_correct(t, o) for t, o in zip(texts[side], outputs, strict=True)]
        )
        for side in SIDES
    }
    same = [a == b for a, b in zip(scores.icl_answer, scores.patched_answer, strict=True)]
    return {**with_intervals("whole_answer_", columns, seed), "whole_answer_agreement": sum(same) / len(same)}


def disagreements(scores: Scores, prompts: Sequence[Prompt], tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    """The prompts whose patched top-1 token is not ICL's: expected only at near-ties of ICL's top two."""
    rows = []
    for index, (icl, patched) in enumerate(zip(scores.icl_top, scores.patched_top, strict=True)):
        if icl != patched:
            rows.append(
                {
                    "prompt": index,
                    "input": prompts[index].query.input,
                    "icl_token": tokenizer.decode([icl]),
                    "patched_token": tokenizer.decode([patched]),
                    "icl_top2_margin": scores.icl_margin[index],
                    "max_abs_logit_diff": scores.max_abs_logit_diff[index],
                }
            )
    return rows


def examples(scores: Scores, prompts: Sequence[Prompt], tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    """The first few prompts' queries with each side's answer (its whole answer, else its first token)."""
    rows = []
    for index, prompt in enumerate(prompts[:N_EXAMPLES]):
        row = {"input": prompt.query.input, "expected": prompt.query.output}
        for side in SIDES:
            tokens = (
                getattr(scores, f"{side}_answer")[index]
                if scores.icl_answer
                else [getattr(scores, f"{side}_top")[index]]
            )
            row[side] = completed_answer(tokenizer.decode(tokens, skip_special_tokens=True))
        rows.append(row)
    return rows


def task_metrics(
    task: Task,
    prompts: Sequence[Prompt],
    scores: Scores,
    tokenizer: PreTrainedTokenizerBase,
    settings: EvaluationSettings,
    seconds: float,
) -> dict:
    """The JSON record of one task (contract keys: task, n, shots, zero_shot_accuracy, icl_accuracy,
    patched_accuracy, patched_agreement, max_abs_logit_diff)."""
    metrics = {
        "task": task.name,
        "kind": task.kind,
        "description": task.description,
        "n": len(prompts),
        "shots": settings.shots,
        "seed": settings.seed,
        **first_token_metrics(scores, settings.seed),
    }
    if settings.whole_answers:
        metrics.update(whole_answer_metrics(scores, prompts, tokenizer, settings.seed))
    metrics["disagreements"] = disagreements(scores, prompts, tokenizer)
    metrics["examples"] = examples(scores, prompts, tokenizer)
    metrics["seconds"] = seconds
    return metrics


def suite_summary(tasks: list[dict]) -> dict:
    """Across tasks: how many show a strong ICL effect, and the patch's worst case."""
    return {
        "n_tasks": len(tasks),
        f"n_tasks_icl_gain_at_least_{STRONG_GAIN}": sum(t["icl_minus_zero_shot"] >= STRONG_GAIN for t in tasks),
        "patched_equals_icl_accuracy_in_every_task": all(t["patched_accuracy"] == t["icl_accuracy"] for t in tasks),
        "patched_agreement_overall": sum(t["patched_agreement"] * t["n"] for t in tasks) / sum(t["n"] for t in tasks),
        "max_abs_logit_diff_overall": max(t["max_abs_logit_diff"] for t in tasks),
        "n_disagreements": sum(len(t["disagreements"]) for t in tasks),
    }
