"""Prompts drawn from a task: K demonstrations and a query, reproducibly for a seed."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from implicit_icl.errors import ImplicitICLError
from implicit_icl.tasks.task import Example, Task
from implicit_icl.tasks.template import format_answer, format_context, format_query


@dataclass(frozen=True)
class Prompt:
    """K demonstrations (`shots`, in prompt order) and the query example whose output is to be predicted."""

    shots: tuple[Example, ...]
    query: Example

    @property
    def context_text(self) -> str:
        """The demonstrations, each "Q: {input}\\nA: {output}\\n\\n"; "" for zero-shot."""
        return format_context(self.shots)

    @property
    def query_text(self) -> str:
        """ "Q: {input}\\nA:" — it ends where the answer starts."""
        return format_query(self.query.input)

    @property
    def answer_text(self) -> str:
        """ " " + the query's output: the continuation the model should write after "A:"."""
        return format_answer(self.query.output)

    @property
    def text(self) -> str:
        return self.context_text + self.query_text


def sample_prompts(task: Task, shots: int, n: int, seed: int) -> list[Prompt]:
    """`n` prompts of `shots` demonstrations each, the same list for the same (task, shots, n, seed).

    Queries go through the task's examples in a shuffled order, reshuffled each time all have been asked, so
    they spread evenly over the task. A prompt's demonstrations are distinct examples in random order, and
    none has the query's input: the model never sees the answer to copy. The one exception is a recall task
    (`task.query_in_context`): its answers exist only in the prompt, so one of the demonstrations, at a random
    position, is the query's own binding (with shots = 0 the query's value appears nowhere: a pure guess).
    Generated tasks draw their examples from the same seed (`task.pool(seed)`).
    """
    if shots < 0 or n < 0:
        raise ImplicitICLError(f"shots and n must be ≥ 0, got shots = {shots}, n = {n}")
    pool = task.pool(seed)
    check_enough_examples(task.name, len(pool), shots)
    rng = random.Random(f"prompts:{task.name}:{seed}")
    return [draw_prompt(task, pool, query, shots, rng) for query in query_order(pool, n, rng)]


def check_enough_examples(name: str, size: int, shots: int) -> None:
    """A prompt needs its query plus `shots` other examples."""
    if size < shots + 1:
        raise ImplicitICLError(
            f"task {name!r} has {size} examples, too few for {shots} shots plus a query; use at most {size - 1} shots"
        )


def query_order(pool: tuple[Example, ...], n: int, rng: random.Random) -> list[Example]:
    """`n` queries: shuffled passes over the pool, so no example is asked twice before all are asked once."""
    queries: list[Example] = []
    while len(queries) < n:
        queries += rng.sample(pool, len(pool))
    return queries[:n]


def draw_prompt(task: Task, pool: tuple[Example, ...], query: Example, shots: int, rng: random.Random) -> Prompt:
    others = [example for example in pool if example.input != query.input]
    if not task.query_in_context or shots == 0:
        return Prompt(tuple(rng.sample(others, shots)), query)
    demonstrations = rng.sample(others, shots - 1)
    demonstrations.insert(rng.randrange(shots), query)
    return Prompt(tuple(demonstrations), query)


def with_outputs_deranged(demonstrations: Sequence[Example], rng: random.Random) -> list[Example]:
    """The demonstrations with their outputs moved along one random cycle, so that none keeps its own
    (where outputs differ): the shuffled-label control. Needs at least 2 demonstrations."""
    if len(demonstrations) < 2:
        raise ImplicitICLError("shuffling answers needs at least 2 demonstrations; use --shots 2 or more")
    order = list(range(len(demonstrations)))
    rng.shuffle(order)
    permuted = [None] * len(order)
    for source, target in zip(order, order[1:] + order[:1], strict=True):
        permuted[target] = demonstrations[source].output
    return [Example(example.input, output) for example, output in zip(demonstrations, permuted, strict=True)]
