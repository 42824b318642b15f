"""What a task is: input → output examples, fixed or drawn from a seeded generator."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from implicit_icl.errors import ImplicitICLError

TaskKind = Literal["knowledge", "language", "procedure", "user"]
TASK_KINDS: tuple[TaskKind, ...] = ("knowledge", "language", "procedure", "user")

# Below this many distinct examples a task cannot give 100 prompts whose queries cover many different items.
MIN_EXAMPLES = 50


def example_problem(input: object, output: object) -> str | None:
    """What is wrong with an input/output pair for the Q/A template, or None when it is usable.

    The template puts the output after "A: " and ends an answer at the first newline, so both sides must be
    non-empty one-line strings without surrounding whitespace (the template supplies the spaces).
    """
    for side, value in (("input", input), ("output", output)):
        if not isinstance(value, str):
            return f"its {side} {value!r} is not a string"
        if not value.strip():
            return f"its {side} is empty"
        if "\n" in value or "\r" in value:
            return f"its {side} {value!r} spans several lines (a newline ends an answer)"
        if value != value.strip():
            return f"its {side} {value!r} has leading or trailing whitespace (the template adds the spaces)"
    return None


@dataclass(frozen=True)
class Example:
    """One input → output pair, e.g. Example("walk", "walked")."""

    input: str
    output: str

    def __post_init__(self) -> None:
        problem = example_problem(self.input, self.output)
        if problem is not None:
            raise ImplicitICLError(f"bad example: {problem}")


Generator = Callable[[random.Random], tuple[Example, ...]]


@dataclass(frozen=True)
class Task:
    """A named in-context task: either fixed `examples` or a `generator` that draws them from a seeded rng.

    query_in_context: the task is associative recall, whose query must repeat one of its own demonstrations
    (see `sample_prompts`); for every other task the query's input is never among its demonstrations.
    """

    name: str
    kind: TaskKind
    description: str
    examples: tuple[Example, ...] = ()
    generator: Generator | None = None
    query_in_context: bool = False

    def __post_init__(self) -> None:
        if (self.generator is None) == (not self.examples):
            raise ImplicitICLError(f"task {self.name!r} needs exactly one of fixed examples or a generator")
        if self.kind not in TASK_KINDS:
            raise ImplicitICLError(f"task {self.name!r} has kind {self.kind!r}; use one of {', '.join(TASK_KINDS)}")
        check_consistent(self.name, self.examples)

    @property
    def generated(self) -> bool:
        return self.generator is not None

    def pool(self, seed: int) -> tuple[Example, ...]:
        """The examples prompts are drawn from: the fixed ones, or the generator's draw for this seed."""
        if self.generator is None:
            return self.examples
        pool = self.generator(random.Random(f"{self.name}:{seed}"))
        check_consistent(self.name, pool)
        return pool


def check_consistent(name: str, examples: Iterable[Example]) -> None:
    """Refuse an input listed with two different outputs: a query could not have one right answer."""
    seen: dict[str, str] = {}
    for example in examples:
        if seen.setdefault(example.input, example.output) != example.output:
            raise ImplicitICLError(
                f"task {name!r} maps {example.input!r} to both {seen[example.input]!r} and {example.output!r}; "
                "keep one output per input"
            )


def fixed_task(name: str, kind: TaskKind, description: str, pairs: Iterable[tuple[str, str]]) -> Task:
    """A task from literal (input, output) pairs."""
    return Task(name, kind, description, examples=tuple(Example(i, o) for i, o in pairs))
