"""Hugging Face engine: exact patches of a Llama-style model against one context-ful forward pass."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from timing import llama_style, wall_seconds  # noqa: E402

from implicit_icl.engine.forward import ForwardInputs, run_model
from implicit_icl.hf import compute_patch, compute_patches, every_position_patches

LAYERS, WIDTH, CONTEXT = 8, 512, 512
# Llama's own vocabulary, and a small one: the head is a large part of a forward pass that the patch
# skips, so the small vocabulary is the stricter comparison.
VOCABULARIES = (32_000, 1_024)


def model_of(vocab_size: int):
    """8 layers, width 512, grouped-query attention."""
    return llama_style(LAYERS, WIDTH, 1376, 8, 2, vocab_size, positions=2 * CONTEXT)


@torch.no_grad()  # the forward pass it is measured against builds no autograd graph either
def run(repeats: int = 5) -> list[tuple[str, float, str]]:
    rows = [row for vocab_size in VOCABULARIES for row in _ratios(vocab_size, repeats)]
    return [*rows, _batched_vs_loop(repeats)]


def _batched_vs_loop(repeats: int, n_pairs: int = 32) -> tuple[str, float, str]:
    """compute_patches on 32 (context, query) pairs of ~60 tokens (contexts of 50–60, queries of 3–6, as in a
    few-shot evaluation) against one compute_patch per pair; medians of back-to-back ratios."""
    model = model_of(VOCABULARIES[0])
    generator = torch.Generator().manual_seed(1)
    lengths = (
        torch.randint(50, 61, (n_pairs,), generator=generator),
        torch.randint(3, 7, (n_pairs,), generator=generator),
    )
    pairs = [
        (
            torch.randint(0, VOCABULARIES[0], (int(n),), generator=generator),
            torch.randint(0, VOCABULARIES[0], (int(q),), generator=generator),
        )
        for n, q in zip(*lengths, strict=True)
    ]
    batched = lambda: compute_patches(model, pairs, dtype=torch.float32)  # noqa: E731
    looped = lambda: [compute_patch(model, context, query, dtype=torch.float32) for context, query in pairs]  # noqa: E731
    batched(), looped()  # warm-up
    ratios = [wall_seconds(looped) / wall_seconds(batched) for _ in range(repeats)]
    setting = f"Llama-style, {LAYERS} layers, width {WIDTH}, {n_pairs} pairs of 53–66 tokens, float32"
    return "loop of compute_patch / one compute_patches", statistics.median(ratios), setting


def _ratios(vocab_size: int, repeats: int) -> list[tuple[str, float, str]]:
    """Each repeat times one forward, one query patch and one every-position pass back to back; the
    median of the per-repeat ratios is robust to load that drifts on a shared machine."""
    model = model_of(vocab_size)
    ids = torch.randint(0, vocab_size, (CONTEXT + 1,), generator=torch.Generator().manual_seed(0))
    setting = f"Llama-style, {LAYERS} layers, width {WIDTH}, vocab {vocab_size}, {CONTEXT}-token context, float32"
    # The reference is the forward pass the engine itself makes: eager attention, explicit positions and mask.
    steps = {
        "forward": lambda: run_model(model, ForwardInputs.plain(ids[None])),
        "query": lambda: compute_patch(model, ids[:-1], ids[-1:], dtype=torch.float32),
        "every": lambda: every_position_patches(model, ids, dtype=torch.float32),
    }
    for step in steps.values():  # warm-up
        step()
    ratios = {"query": [], "every": []}
    for _ in range(repeats):
        seconds = {name: wall_seconds(step) for name, step in steps.items()}
        for name in ratios:
            ratios[name].append(seconds[name] / seconds["forward"])
    return [
        ("exact patch for the query / one context-ful forward", statistics.median(ratios["query"]), setting),
        (f"all {CONTEXT + 1} every-position patches / one forward", statistics.median(ratios["every"]), setting),
    ]
