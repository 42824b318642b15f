"""Patched generation in bfloat16 per zoo family and output side: teacher-forced and free-running agreement
beside the floor bfloat16 itself sets (docs/results/bf16.md).

    .venv/bin/python scripts/bf16_generation.py [--prompts 5] [--tokens 32]

Each tiny zoo model (seed 0) runs in bfloat16; patches are computed in float32. For each prompt (16 random
context tokens and one query token), `--tokens` tokens are generated greedily with the context and without
it under per-token patches: through hooks (the cached pass that builds each patch applies it, float32
arithmetic) and, free-running only, added to the bfloat16 weights. The floor is the same model with its
context in bfloat16 against float32 (scripts/bf16_real_model.py). Means over prompts.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bf16_real_model import floor
from rich.console import Console
from rich.table import Table

from implicit_icl.hf import SPECS, patched_generate
from implicit_icl.models.zoo import ENCODER_FAMILIES, VOCAB_SIZE, ZOO_CASES, tiny_model

COLUMNS = ("hooks TF", "hooks FR", "weights FR", "floor TF", "floor FR")


def scores(family: str, output: str, prompts: int, tokens: int) -> list[float]:
    """The mean of each column over `prompts` random prompts."""
    bf16, float32 = tiny_model(family, seed=0, dtype=torch.bfloat16), tiny_model(family, seed=0, dtype=torch.float32)
    rows = []
    for prompt in range(prompts):
        ids = torch.randint(0, VOCAB_SIZE, (17,), generator=torch.Generator().manual_seed(prompt))
        hooks, weights = (
            patched_generate(bf16, ids[:-1], ids[-1:], tokens, output=output, via=via) for via in ("hooks", "weights")
        )
        rows.append(
            [hooks.teacher_forced_agreement, hooks.agreement, weights.agreement, *floor(bf16, float32, ids, tokens)]
        )
    return [statistics.mean(column) for column in zip(*rows, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32)
    arguments = parser.parse_args()
    table = Table(title=f"bfloat16 greedy agreement, {arguments.tokens} tokens, {arguments.prompts} prompts")
    for column in ("family", "output side", *COLUMNS):
        table.add_column(column)
    families = [family for family in dict(ZOO_CASES) if family in SPECS and family not in ENCODER_FAMILIES]
    for family in families:
        for output in SPECS[family].output_sides:
            values = scores(family, output, arguments.prompts, arguments.tokens)
            table.add_row(family, output, *(f"{value:.0%}" for value in values))
            print(family, output, " ".join(f"{value:.3f}" for value in values), flush=True)
    Console().print(table)


if __name__ == "__main__":
    main()
