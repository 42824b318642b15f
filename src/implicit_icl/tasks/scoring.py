"""Is the model's answer right: by its first token, or the whole greedy answer up to the separator."""

from __future__ import annotations

from implicit_icl.tasks.template import SEPARATOR


def completed_answer(generated_text: str) -> str:
    """The answer a greedy continuation of "A:" gives: its text up to the first newline, without the spaces."""
    return generated_text.split(SEPARATOR, 1)[0].strip()


def whole_answer_correct(generated_text: str, output: str) -> bool:
    """Whether greedy decoding wrote exactly `output` before the separator (or the end of its budget).

    generated_text: the decoded new tokens, `EncodedPrompt.generation_budget` of them at most, stopping after
    the first that holds a newline. The budget leaves one token past the answer, so an answer that goes on
    (" walkedly", " walked and") differs from `output` and counts as wrong.
    """
    return completed_answer(generated_text) == output
