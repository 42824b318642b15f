"""A user's task from a JSON file: a list of {"input": ..., "output": ...} objects."""

from __future__ import annotations

import json
from pathlib import Path

from implicit_icl.errors import ImplicitICLError
from implicit_icl.tasks.sampling import check_enough_examples
from implicit_icl.tasks.task import Example, Task, example_problem


def load_task_file(path: str | Path, shots: int = 0, name: str | None = None) -> Task:
    """The task a JSON file describes, named after the file unless `name` is given.

    The file holds a list of objects with non-empty one-line string values "input" and "output", no input
    twice, and at least shots + 1 of them (a query and its demonstrations). Anything else is refused in one
    line that says what and where (the entry's index).
    """
    path = Path(path)
    name = name or path.stem
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ImplicitICLError(f"cannot read task file {path}: {error.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ImplicitICLError(f"task file {path} is not JSON: {str(error).splitlines()[0]}") from None
    examples = parse_entries(path, entries)
    check_enough_examples(name, len(examples), shots)
    return Task(name, "user", f"examples from {path.name}", examples=examples)


JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type: "object", "array", ..., "null"."""
    return JSON_TYPES.get(type(value), "null")


def parse_entries(path: Path, entries: object) -> tuple[Example, ...]:
    if not isinstance(entries, list):
        raise ImplicitICLError(
            f'task file {path} holds a JSON {json_type(entries)}; it must be a list of {{"input": ..., '
            '"output": ...}} objects'
        )
    if not entries:
        raise ImplicitICLError(f"task file {path} holds an empty list; add input/output examples")
    examples: list[Example] = []
    first_index: dict[str, int] = {}
    for index, entry in enumerate(entries):
        problem = entry_problem(entry)
        if problem is None and entry["input"] in first_index:
            problem = f"its input {entry['input']!r} is already entry {first_index[entry['input']]}'s"
        if problem is not None:
            raise ImplicitICLError(f"task file {path}: entry {index} is unusable: {problem}")
        first_index[entry["input"]] = index
        examples.append(Example(entry["input"], entry["output"]))
    return tuple(examples)


def entry_problem(entry: object) -> str | None:
    """What is wrong with one entry of a task file, or None."""
    if not isinstance(entry, dict):
        return f'it is a JSON {json_type(entry)}, not an {{"input": ..., "output": ...}} object'
    missing = [key for key in ("input", "output") if key not in entry]
    if missing:
        return f"it has no {' or '.join(repr(key) for key in missing)} key"
    return example_problem(entry["input"], entry["output"])
