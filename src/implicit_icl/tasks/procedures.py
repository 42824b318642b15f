"""Procedure tasks: a rule the demonstrations show, applied to words, letters or lists drawn from a seed.

Associative recall is the one task whose answers exist only in the prompt. Every noun is bound to another
noun drawn at random for the seed (river → candle), the demonstrations are some of these bindings, and the
query asks for a key one of them just showed. Nothing outside the prompt links a key to its value, so without
the demonstrations a model can only guess: one of 229 values, about 0.4%.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterable

from implicit_icl.tasks.task import Example, Task, fixed_task
from implicit_icl.tasks.words import NOUNS

LIST_LENGTHS = (3, 4, 5)
LIST_POOL_SIZE = 200  # lists per seed: far more than the 100 queries a measurement asks for
LIST_SEPARATOR = ", "


def rule_task(name: str, description: str, inputs: Iterable[str], rule: Callable[[str], str]) -> Task:
    """A procedure task whose examples are `rule` applied to every input."""
    return fixed_task(name, "procedure", description, ((x, rule(x)) for x in inputs))


def next_letter_pairs() -> list[tuple[str, str]]:
    """a → b … y → z and A → B … Y → Z: 50 pairs (z has no next letter)."""
    return [
        (letters[i], letters[i + 1])
        for letters in (string.ascii_lowercase, string.ascii_uppercase)
        for i in range(len(letters) - 1)
    ]


def word_lists(rng: random.Random, count: int = LIST_POOL_SIZE) -> list[tuple[str, ...]]:
    """`count` distinct lists of 3 to 5 distinct nouns."""
    lists: dict[tuple[str, ...], None] = {}  # a dict keeps the draw order, so the pool is the same every run
    while len(lists) < count:
        lists[tuple(rng.sample(NOUNS, rng.choice(LIST_LENGTHS)))] = None
    return list(lists)


def first_item_examples(rng: random.Random) -> tuple[Example, ...]:
    return tuple(Example(LIST_SEPARATOR.join(items), items[0]) for items in word_lists(rng))


def last_item_examples(rng: random.Random) -> tuple[Example, ...]:
    return tuple(Example(LIST_SEPARATOR.join(items), items[-1]) for items in word_lists(rng))


def random_bindings(rng: random.Random) -> tuple[Example, ...]:
    """Every noun → another noun drawn at random (values may repeat across keys): 230 bindings per seed."""
    return tuple(Example(key, rng.choice([value for value in NOUNS if value != key])) for key in NOUNS)


PROCEDURE_TASKS: tuple[Task, ...] = (
    rule_task("uppercase", "word → the word in capitals", NOUNS, str.upper),
    rule_task("capitalize", "word → the word with a capital first letter", NOUNS, str.capitalize),
    rule_task("copy", "word → the same word", NOUNS, str),
    fixed_task("next_letter", "procedure", "letter → the next letter of the alphabet, same case", next_letter_pairs()),
    Task("first_item", "procedure", "list of 3-5 nouns → its first item", generator=first_item_examples),
    Task("last_item", "procedure", "list of 3-5 nouns → its last item", generator=last_item_examples),
    Task(
        "associative_recall",
        "procedure",
        "noun → the noun it is bound to in this prompt's demonstrations (random bindings per seed)",
        generator=random_bindings,
        query_in_context=True,
    ),
)
