"""Patched generation on the default model: per-token cost of the cached patched path against HF's generate."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from timing import median_seconds  # noqa: E402

from implicit_icl.cli.patch import plain_seconds_per_token
from implicit_icl.engine.generate import patched_generate
from implicit_icl.models.load import load_model

CONTEXT = "Q: walk\nA: walked\n\nQ: jump\nA: jumped\n\nQ: see\nA: saw\n\nQ: eat\nA: ate\n\nQ: go\nA: went\n\n"
QUERY, NEW_TOKENS = "Q: speak\nA:", 32


def run(repeats: int = 3) -> list[tuple[str, float, str]]:
    loaded = load_model()
    encode = lambda text: torch.tensor(loaded.tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    context, query = encode(CONTEXT), encode(QUERY)
    prompt = torch.cat([context, query])
    patched = [patched_generate(loaded.model, context, query, NEW_TOKENS) for _ in range(repeats)]
    patched_seconds = sorted(g.seconds_per_token_patched for g in patched)[repeats // 2]
    plain = sorted(plain_seconds_per_token(loaded.model, prompt, NEW_TOKENS) for _ in range(repeats))[repeats // 2]
    uncached = median_seconds(
        lambda: patched_generate(loaded.model, context, query, 4, cache=False), repeats=1, warmup=0
    )
    cached = median_seconds(lambda: patched_generate(loaded.model, context, query, 4), repeats=1, warmup=0)
    setting = f"SmolLM2-135M float32, 5-shot prompt ({prompt.numel()} tokens)"
    return [
        ("patched token / HF cached generate token", patched_seconds / plain, f"{setting}, {NEW_TOKENS} new tokens"),
        ("uncached / cached patched generation (both paths)", uncached / cached, f"{setting}, 4 new tokens"),
    ]
