"""Patched generation in bfloat16 on a real model: teacher-forced and free-running agreement, against the
floor bfloat16 itself sets (docs/results/bf16.md).

    .venv/bin/python scripts/bf16_real_model.py [--model gemma3-270m] [--prompts 5] [--tokens 32] [--json F]

For each task, held-out 5-shot prompts (seed 1) generate `--tokens` tokens greedily in bfloat16, with the
context and without it under per-token patches (float32 arithmetic, applied through hooks):
- patch, teacher-forced: the patched top-1 for the context-ful path's own prefix is the context's top-1;
- patch, free-running: the patched path, fed its own tokens, picks the context's token at that step.
The floor is the same model with its context, run in bfloat16 against float32: teacher-forced (bfloat16's
top-1 on float32's greedy prefix) and free-running (the two greedy sequences, position by position). A
patch cannot be asked to agree with the bfloat16 model better than bfloat16 agrees with float32 (itself).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from rich.console import Console
from rich.table import Table

from implicit_icl.engine.forward import ForwardInputs, run_model
from implicit_icl.engine.generate import patched_generate
from implicit_icl.models.load import load_model
from implicit_icl.tasks import encode, sample_prompts, task

TASKS = ("present_past", "antonym", "country_capital", "english_french")


@torch.no_grad()
def floor(bf16_model, float32_model, prompt_ids: torch.Tensor, tokens: int) -> tuple[float, float]:
    """bfloat16 vs float32 with the context: (teacher-forced, free-running) agreement over `tokens` steps."""
    reference = float32_model.generate(prompt_ids[None], max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    own = bf16_model.generate(prompt_ids[None], max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    n = prompt_ids.numel()
    logits = run_model(bf16_model, ForwardInputs.plain(reference[:, :-1]))[0, n - 1 :]
    forced = (logits.argmax(-1) == reference[0, n:]).float().mean().item()
    free = (own[0, n:] == reference[0, n:]).float().mean().item()
    return forced, free


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--via", default="hooks")
    parser.add_argument("--json", default=None)
    arguments = parser.parse_args()
    bf16, float32 = load_model(arguments.model, dtype="bfloat16"), load_model(arguments.model, dtype="float32")
    rows = []
    for name in TASKS:
        for prompt in sample_prompts(task(name), shots=5, n=arguments.prompts, seed=1):
            encoded = encode(bf16.tokenizer, prompt)
            generation = patched_generate(
                bf16.model, encoded.context_ids, encoded.query_ids, arguments.tokens, via=arguments.via
            )
            forced, free = floor(bf16.model, float32.model, encoded.input_ids, arguments.tokens)
            rows.append(
                dict(
                    task=name,
                    patch_teacher_forced=generation.teacher_forced_agreement,
                    patch_free_running=generation.agreement,
                    floor_teacher_forced=forced,
                    floor_free_running=free,
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    keys = ("patch_teacher_forced", "patch_free_running", "floor_teacher_forced", "floor_free_running")
    table = Table(title=f"{bf16.name} in bfloat16, {arguments.tokens} tokens, {arguments.prompts} prompts per task")
    for column in ("task", *keys):
        table.add_column(column)
    for name in (*TASKS, "mean"):
        selected = [row for row in rows if name in (row["task"], "mean")]
        table.add_row(name, *(f"{statistics.mean(row[key] for row in selected):.3f}" for key in keys))
    Console().print(table)
    if arguments.json:
        with open(arguments.json, "w") as file:
            json.dump(dict(model=bf16.name, tokens=arguments.tokens, via=arguments.via, rows=rows), file, indent=1)


if __name__ == "__main__":
    main()
