"""Greedy-token agreement of patched generation in bfloat16, per family and output side (docs/results/bf16.md).

    .venv/bin/python scripts/bf16_generation.py [--prompts 5] [--tokens 32]

Each tiny zoo model (the family's default variant) runs in bfloat16; patches are computed in float32.
For each prompt (16 random context tokens and one query token), 32 tokens are generated greedily with
the context and without it under per-token patches, added to the bfloat16 weights or applied through
hooks (W untouched); the table gives the mean fraction of agreeing tokens.
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table

from implicit_icl.hf import SPECS, patched_generate
from implicit_icl.models.zoo import ENCODER_FAMILIES, VOCAB_SIZE, ZOO_CASES, tiny_model

VIAS = ("weights", "hooks")


def agreement(family: str, output: str, via: str, prompts: int, tokens: int) -> float:
    model = tiny_model(family, seed=0, dtype=torch.bfloat16)
    total = 0.0
    for prompt in range(prompts):
        ids = torch.randint(0, VOCAB_SIZE, (17,), generator=torch.Generator().manual_seed(prompt))
        generation = patched_generate(model, ids[:-1], ids[-1:], tokens, output=output, dtype=torch.float32, via=via)
        total += generation.agreement
    return total / prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32)
    arguments = parser.parse_args()
    table = Table(title=f"bfloat16 greedy agreement, {arguments.tokens} tokens, {arguments.prompts} prompts")
    for column in ("family", "output side", "patch in the weights", "patch through hooks"):
        table.add_column(column)
    families = [family for family in dict(ZOO_CASES) if family in SPECS and family not in ENCODER_FAMILIES]
    for family in families:
        for output in SPECS[family].output_sides:
            scores = [agreement(family, output, via, arguments.prompts, arguments.tokens) for via in VIAS]
            table.add_row(family, output, *(f"{score:.0%}" for score in scores))
    Console().print(table)


if __name__ == "__main__":
    main()
