"""Greedy generation without the context under per-token patches picks the tokens the context picks."""

import pytest
import torch

from implicit_icl.hf import SPECS, patched_generate
from implicit_icl.models.zoo import ENCODER_FAMILIES, VOCAB_SIZE, ZOO_CASES, tiny_model

# Each decoder family's default variant (an encoder does not generate).
FAMILIES = [family for family in dict(ZOO_CASES) if family in SPECS and family not in ENCODER_FAMILIES]


@pytest.mark.parametrize("family", FAMILIES)
def test_32_tokens_agree_in_float32(family):
    model = tiny_model(family, seed=5, dtype=torch.float32)
    ids = torch.randint(0, VOCAB_SIZE, (17,), generator=torch.Generator().manual_seed(5))
    generation = patched_generate(model, ids[:-1], ids[-1:], max_new_tokens=32)
    assert generation.agreement == 1.0, generation
    assert generation.tokens_patched == generation.tokens_with_context and len(generation.tokens_patched) == 32
    assert generation.tokens_with_context != _greedy_without_context(model, ids[-1:], position=16, steps=32)


@torch.no_grad()
def _greedy_without_context(model, query, position, steps):
    """The guard: unpatched and without the context, the model generates something else."""
    tokens = query.clone()
    for _ in range(steps):
        positions = torch.arange(position, position + tokens.numel())[None]
        tokens = torch.cat([tokens, model(tokens[None], position_ids=positions).logits[0, -1].argmax()[None]])
    return tokens[1:].tolist()
