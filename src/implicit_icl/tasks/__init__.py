"""In-context tasks for a real language model: data, the Q/A prompt template, sampling, tokens and scoring.

    from implicit_icl.tasks import task, sample_prompts, encode
    prompts = sample_prompts(task("present_past"), shots=5, n=100, seed=0)
    encoded = [encode(tokenizer, p) for p in prompts]     # context_ids, query_ids, answer_ids

Tasks are of three kinds: knowledge (facts), language (word transformations) and procedure (rules applied to
words, letters or lists, and associative recall of bindings defined only in the prompt); a user's own task
comes from a JSON file (`load_task_file`).
"""

from implicit_icl.tasks.encoding import EncodedPrompt, encode
from implicit_icl.tasks.evaluate import Answers, answer_prompts, greedy_continuations, next_token_logits
from implicit_icl.tasks.files import load_task_file
from implicit_icl.tasks.registry import TASKS, task, task_names
from implicit_icl.tasks.sampling import Prompt, sample_prompts, with_outputs_deranged
from implicit_icl.tasks.scoring import completed_answer, whole_answer_correct
from implicit_icl.tasks.task import Example, Task, TaskKind
from implicit_icl.tasks.template import format_context, format_query, parse_context

__all__ = [
    "TASKS",
    "Answers",
    "EncodedPrompt",
    "Example",
    "Prompt",
    "Task",
    "TaskKind",
    "answer_prompts",
    "completed_answer",
    "encode",
    "format_context",
    "format_query",
    "greedy_continuations",
    "load_task_file",
    "next_token_logits",
    "parse_context",
    "sample_prompts",
    "task",
    "task_names",
    "whole_answer_correct",
    "with_outputs_deranged",
]
