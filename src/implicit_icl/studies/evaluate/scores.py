"""Zero-shot vs in-context (ICL) vs the query alone under its exact patch, over prompts of the task suite.

Per batch of prompts (docs/experiments.md §6), at the answer position:
- zero-shot: the query alone, at positions 0 .. Q − 1;
- ICL: context then query, left-padded, and its greedy answer (`tasks.evaluate.decode_greedily`);
- patched: the query alone at its original positions C .. C + Q − 1, under its own exact patch. The patches of
  the whole batch come from one `compute_patches` call (one padded context-ful pass, one reduced pass) and act
  through hooks, entry i on batch row i, on the same left-padded layout the construction used.
Whole answers are decoded greedily until the separator. The patched side never sees the context: its first
token is the patched first-token prediction, and each later step feeds the newest token alone, at its
position, under the exact patch of everything before it, built from a key-value cache of the sequence so far
(`engine.growing.GrowingContext`, one prompt at a time).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from implicit_icl.engine.construct import compute_patches
from implicit_icl.engine.growing import GrowingContext
from implicit_icl.errors import ImplicitICLError
from implicit_icl.tasks import EncodedPrompt, Prompt, Task, encode, sample_prompts
from implicit_icl.tasks.evaluate import answer_ends, decode_greedily, next_token_logits

Progress = Callable[[int], None]  # called with the number of prompts just finished


@dataclass(frozen=True)
class EvaluationSettings:
    """shots: demonstrations per prompt (≥ 1: a patch needs a context); n: prompts per task; seed: of the
    prompts and of the bootstrap; batch_size: prompts per forward pass; whole_answers: also decode greedily."""

    shots: int = 5
    n: int = 100
    seed: int = 0
    batch_size: int = 16
    whole_answers: bool = True

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ImplicitICLError(f"--n must be at least 1 prompt per task, got {self.n}")
        if self.shots < 1:
            raise ImplicitICLError(
                f"--shots must be at least 1, got {self.shots}: the patch is made from the demonstrations"
            )
        if self.batch_size < 1:
            raise ImplicitICLError(f"--batch-size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class FirstTokenLogits:
    """Logits at the answer position, [B, V] each, on the CPU."""

    zero_shot: Tensor
    icl: Tensor
    patched: Tensor


@torch.no_grad()
def patched_next_token_logits(
    model: PreTrainedModel, contexts: Sequence[Tensor], queries: Sequence[Tensor], arithmetic: torch.dtype
) -> Tensor:
    """Each query alone at its original positions under the exact patch of its own context: [B, V].

    contexts, queries: B LongTensors [C_b] (C_b ≥ 1) and [Q_b] (Q_b ≥ 1)."""
    patch = compute_patches(model, list(zip(contexts, queries, strict=True)), dtype=arithmetic)
    positions = [torch.arange(len(c), len(c) + len(q)) for c, q in zip(contexts, queries, strict=True)]
    with patch.applied(model):
        return next_token_logits(model, queries, positions)


def patched_answers(
    model: PreTrainedModel,
    sequences: Sequence[Tensor],
    budgets: Sequence[int],
    ends: Callable[[int], bool],
    first_tokens: Sequence[int],
    arithmetic: torch.dtype,
) -> list[list[int]]:
    """Up to budgets[b] greedy tokens after each sequence b [T_b] without its context, starting from
    first_tokens[b]: each next token is the newest one alone under the patch of everything before it, from a
    growing key-value cache (engine/growing.py: two one-token passes per token)."""
    answers = []
    for sequence, budget, token in zip(sequences, budgets, first_tokens, strict=True):
        answer, growing = ([token] if budget > 0 else []), None
        while answer and not ends(token) and len(answer) < budget:
            growing = growing or GrowingContext(model, sequence, None, arithmetic)
            token = int(growing.step(token).patched_logits.argmax())
            answer.append(token)
        answers.append(answer)
    return answers


@dataclass(frozen=True)
class BatchAnswers:
    """A batch's logits at the answer position, and its greedy answers (B token lists per side, or None)."""

    logits: FirstTokenLogits
    zero_shot: list[list[int]] | None = None
    icl: list[list[int]] | None = None
    patched: list[list[int]] | None = None


def answer_batch(
    model: PreTrainedModel,
    prompts: Sequence[EncodedPrompt],
    arithmetic: torch.dtype,
    ends: Callable[[int], bool] | None = None,
) -> BatchAnswers:
    """First-token logits three ways and, when `ends` is given, whole greedy answers three ways, each until its
    first token that `ends` or `generation_budget` tokens; every side starts from its own first-token choice."""
    budgets = [p.generation_budget if ends is not None else 1 for p in prompts]
    stop = ends or (lambda token: True)
    queries, with_context = [p.query_ids for p in prompts], [p.input_ids for p in prompts]
    zero_shot_logits, zero_shot = decode_greedily(model, queries, budgets, stop)
    icl_logits, icl = decode_greedily(model, with_context, budgets, stop)
    patched_logits = patched_next_token_logits(model, [p.context_ids for p in prompts], queries, arithmetic)
    logits = FirstTokenLogits(zero_shot_logits, icl_logits, patched_logits)
    if ends is None:
        return BatchAnswers(logits)
    first = patched_logits.argmax(-1).tolist()
    patched = patched_answers(model, with_context, budgets, ends, first, arithmetic)
    return BatchAnswers(logits, zero_shot, icl, patched)


@dataclass
class Scores:
    """Per-prompt results of one task, [N] each (lists of N token lists for the whole answers)."""

    answer_token: list[int] = field(default_factory=list)
    zero_shot_top: list[int] = field(default_factory=list)
    icl_top: list[int] = field(default_factory=list)
    patched_top: list[int] = field(default_factory=list)
    icl_margin: list[float] = field(default_factory=list)  # ICL's top-1 minus top-2 logit
    max_abs_logit_diff: list[float] = field(default_factory=list)  # patched vs ICL, over the vocabulary
    zero_shot_answer: list[list[int]] = field(default_factory=list)
    icl_answer: list[list[int]] = field(default_factory=list)
    patched_answer: list[list[int]] = field(default_factory=list)

    def add_first_tokens(self, prompts: Sequence[EncodedPrompt], logits: FirstTokenLogits) -> None:
        top2 = logits.icl.double().topk(2, dim=-1).values
        self.answer_token += [p.answer_token for p in prompts]
        self.zero_shot_top += logits.zero_shot.argmax(-1).tolist()
        self.icl_top += logits.icl.argmax(-1).tolist()
        self.patched_top += logits.patched.argmax(-1).tolist()
        self.icl_margin += (top2[:, 0] - top2[:, 1]).tolist()
        self.max_abs_logit_diff += (logits.patched.double() - logits.icl.double()).abs().amax(-1).tolist()


def score_task(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    settings: EvaluationSettings,
    arithmetic: torch.dtype,
    progress: Progress | None = None,
) -> Scores:
    """Every prompt's first-token and (settings.whole_answers) whole-answer predictions, in batches."""
    encoded = [encode(tokenizer, prompt) for prompt in prompts]
    scores = Scores()
    for start in range(0, len(encoded), settings.batch_size):
        batch = encoded[start : start + settings.batch_size]
        answers = answer_batch(model, batch, arithmetic, answer_ends(tokenizer) if settings.whole_answers else None)
        scores.add_first_tokens(batch, answers.logits)
        if settings.whole_answers:
            scores.zero_shot_answer += answers.zero_shot
            scores.icl_answer += answers.icl
            scores.patched_answer += answers.patched
        if progress is not None:
            progress(len(batch))
    return scores


def task_prompts(task: Task, settings: EvaluationSettings) -> list[Prompt]:
    """The task's prompts for these settings (ImplicitICLError when it has too few examples for the shots)."""
    return sample_prompts(task, settings.shots, settings.n, settings.seed)
