"""The identity of Thm 2.2 checked on a random contextual block: what `implicit-icl demo` shows today."""

from __future__ import annotations

import torch
from torch import nn

from implicit_icl.attention import CausalSelfAttention
from implicit_icl.block import ContextualBlock


def random_block_check(seed: int = 0, width: int = 16, context_length: int = 12) -> dict[str, float]:
    """Build a random pre-LayerNorm attention block in float64, remove its context by a rank-1 update of
    the first MLP matrix plus an output shift, and measure how well the query alone reproduces the output.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    attention = CausalSelfAttention(width, width, n_heads=2)
    mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
    block = ContextualBlock(attention, mlp, skip=True, norm=nn.LayerNorm(width)).double()
    sequence = torch.randn(context_length + 1, width, generator=generator, dtype=torch.float64)
    context, query = sequence[:-1], sequence[-1]
    with torch.no_grad():
        with_context = block(sequence)[-1]
        update = block.update_for_query(context, query)
        patched = block(query[None], update)[-1]
        unpatched = block(query[None])[-1]
    singular_values = torch.linalg.svdvals(update.weight.dense())
    return {
        "context_length": context_length,
        "max_abs_diff_patched": (patched - with_context).abs().max().item(),
        "max_rel_diff_patched": ((patched - with_context).norm() / with_context.norm()).item(),
        "max_abs_diff_unpatched": (unpatched - with_context).abs().max().item(),
        "update_norm": update.weight.norm().item(),
        "rank1_sigma_ratio": (singular_values[1] / singular_values[0]).item(),
    }
