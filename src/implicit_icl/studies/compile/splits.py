"""The inputs of one compile-study run: a task's inputs split into disjoint parts, and their token ids.

- `split_task`: K demonstrations (the context), chosen by `context`; from the rest, shuffled by (context,
  seed), dev queries, held-out queries and calibration queries, shrunk by a stated rule for small tasks;
- `encode_split`: the ids under the task template (`tasks.encode`), and the context with its demonstrations'
  labels shuffled (for the function vector's indirect effects).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from implicit_icl.errors import ImplicitICLError
from implicit_icl.tasks import Example, Task, encode, format_query, with_outputs_deranged
from implicit_icl.tasks.encoding import token_ids
from implicit_icl.tasks.sampling import Prompt


@dataclass(frozen=True)
class Split:
    """Disjoint inputs of one task: demonstrations, calibration, dev and held-out examples."""

    task: str
    demonstrations: tuple[Example, ...]
    calibration: tuple[Example, ...]
    dev: tuple[Example, ...]
    heldout: tuple[Example, ...]
    shrunk: bool = False  # the task had too few inputs for the sizes asked


def split_task(task: Task, shots: int, calibration: int, dev: int, n: int, context: int, seed: int) -> Split:
    """The split of module docstring: demonstrations drawn with `context`, the rest shuffled with (context,
    seed). When the task has too few inputs, dev keeps its size (at most a quarter of what is left) and the
    held-out and calibration sets share the rest, held-out first up to half."""
    if task.query_in_context:
        raise ImplicitICLError(
            f"task {task.name!r} binds its answers inside each prompt, so no fixed context serves other queries; "
            "choose another task"
        )
    pool = list(task.pool(0))
    rng = random.Random(f"compile:{task.name}:context:{context}")
    rng.shuffle(pool)
    demonstrations, rest = pool[:shots], pool[shots:]
    random.Random(f"compile:{task.name}:context:{context}:seed:{seed}").shuffle(rest)
    n_dev, n_heldout, n_calibration = split_sizes(len(rest), calibration, dev, n)
    if min(n_dev, n_heldout, n_calibration) < 1 or len(demonstrations) < shots:
        raise ImplicitICLError(
            f"task {task.name!r} has {len(pool)} inputs, too few for {shots} demonstrations and ≥ 1 dev, held-out "
            "and calibration query each; use fewer shots"
        )
    return Split(
        task.name,
        tuple(demonstrations),
        tuple(rest[n_dev + n_heldout : n_dev + n_heldout + n_calibration]),
        tuple(rest[:n_dev]),
        tuple(rest[n_dev : n_dev + n_heldout]),
        shrunk=(n_heldout, n_calibration, n_dev) != (n, calibration, dev),
    )


def split_sizes(available: int, calibration: int, dev: int, n: int) -> tuple[int, int, int]:
    """(dev, held-out, calibration) sizes from `available` items: dev keeps its size (at most a quarter), and
    held-out and calibration share the rest, held-out first up to half. A size can come out 0."""
    n_dev = min(dev, available // 4)
    left = available - n_dev
    n_heldout, n_calibration = n, calibration
    if n + calibration > left:
        n_heldout = min(n, (left + 1) // 2)
        n_calibration = min(calibration, left - n_heldout)
    return n_dev, n_heldout, n_calibration


@dataclass(frozen=True)
class Encoded:
    """Token ids of a run: the context, its shuffled-label version (None: none can be made), and the
    calibration, dev and held-out queries; answers: the first token of each answer (None: unlabelled, ICL's
    top-1 token stands in)."""

    context_ids: Tensor
    shuffled_context_ids: Tensor | None
    calibration: list[Tensor]
    dev: list[Tensor]
    heldout: list[Tensor]
    dev_answers: Tensor | None
    heldout_answers: Tensor | None


def shuffled_labels(demonstrations: Sequence[Example], seed: int) -> list[Example]:
    """The demonstrations with their outputs permuted so that none keeps its own (where outputs differ)."""
    return with_outputs_deranged(demonstrations, random.Random(f"shuffled:{seed}"))


def encode_split(tokenizer, split: Split, seed: int = 0) -> Encoded:
    """The ids of every part of the split under the task template (`tasks.encode`)."""
    if tokenizer is None:
        raise ImplicitICLError("task prompts are text, so the model needs a tokenizer; use --context-ids data instead")

    def queries(examples) -> tuple[list[Tensor], Tensor]:
        encoded = [encode(tokenizer, Prompt(split.demonstrations, example)) for example in examples]
        for item in encoded:
            if not torch.equal(item.context_ids, encoded[0].context_ids):
                raise ImplicitICLError("the tokenizer reads the context differently before different queries")
        return [item.query_ids for item in encoded], torch.tensor([item.answer_token for item in encoded])

    dev, dev_answers = queries(split.dev)
    heldout, heldout_answers = queries(split.heldout)
    context = encode(tokenizer, Prompt(split.demonstrations, split.dev[0])).context_ids
    shuffled = encode(tokenizer, Prompt(tuple(shuffled_labels(split.demonstrations, seed)), split.dev[0])).context_ids
    calibration = [torch.tensor(token_ids(tokenizer, format_query(example.input))) for example in split.calibration]
    return Encoded(context, shuffled, calibration, dev, heldout, dev_answers, heldout_answers)
