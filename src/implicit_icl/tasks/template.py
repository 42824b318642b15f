"""The one prompt template: "Q: {input}\\nA: {output}\\n\\n" per demonstration, then "Q: {input}\\nA:".

The query stops right after "A:", so the model's next token is the first token of " " + output: the space
belongs to the answer, as it does in every demonstration. A newline ends an answer (whole-answer decoding
stops there), so inputs and outputs are one line each (`Example` checks it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from implicit_icl.errors import ImplicitICLError
from implicit_icl.tasks.task import Example

DEMONSTRATION = "Q: {input}\nA: {output}\n\n"
QUERY = "Q: {input}\nA:"
ANSWER = " {output}"
SEPARATOR = "\n"  # ends an answer

_DEMONSTRATION_PATTERN = re.compile(r"Q: ([^\n]+)\nA: ([^\n]+)\n\n")


def format_demonstration(example: Example) -> str:
    return DEMONSTRATION.format(input=example.input, output=example.output)


def format_context(shots: Iterable[Example]) -> str:
    """All demonstrations, each ending with a blank line; "" for none."""
    return "".join(format_demonstration(shot) for shot in shots)


def format_query(input: str) -> str:
    return QUERY.format(input=input)


def format_answer(output: str) -> str:
    """The text that follows "A:" in a demonstration: " " + output."""
    return ANSWER.format(output=output)


def parse_context(context: str) -> tuple[Example, ...]:
    """The demonstrations back from `format_context`'s text."""
    examples, position = [], 0
    while position < len(context):
        match = _DEMONSTRATION_PATTERN.match(context, position)
        if match is None:
            raise ImplicitICLError(
                f"context text at character {position} is not a 'Q: ...\\nA: ...\\n\\n' demonstration: "
                f"{context[position : position + 40]!r}"
            )
        examples.append(Example(match[1], match[2]))
        position = match.end()
    return tuple(examples)
