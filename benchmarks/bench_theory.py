"""Theory core: factored rank-1 updates and batched every-position updates against the naive ways."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from timing import median_seconds  # noqa: E402

from implicit_icl import ContextualBlock  # noqa: E402
from implicit_icl.theory import rank_one_update  # noqa: E402
from implicit_icl.toy.attention import CausalSelfAttention  # noqa: E402


def factored_vs_dense(out: int = 2048, inp: int = 512, batch: int = 64) -> tuple[str, float, str]:
    """Applying ΔW to a batch of inputs from its factors vs materialising W + ΔW first."""
    weight, a_context, a = torch.randn(out, inp), torch.randn(inp), torch.randn(inp)
    x = torch.randn(batch, inp)
    update = rank_one_update(weight, a_context, a)
    factored = median_seconds(lambda: x @ weight.T + update.apply(x))
    dense = median_seconds(lambda: x @ (weight + update.dense()).T)
    return "dense W+ΔW / factored u(v·x)", dense / factored, f"W {out}×{inp}, {batch} inputs"


def every_position_vs_loop(length: int = 128, width: int = 64) -> tuple[str, float, str]:
    """All T positions' own updates in one batched call vs one update_for_query call per position."""
    torch.manual_seed(0)
    attention = CausalSelfAttention(width, width, n_heads=4)
    mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
    block = ContextualBlock(attention, mlp, skip=True, norm=nn.LayerNorm(width))
    sequence = torch.randn(length, width)

    def loop():
        for i in range(1, length):
            block.update_for_query(sequence[:i], sequence[i])

    with torch.no_grad():
        batched = median_seconds(lambda: block.updates_every_position(sequence), repeats=5)
        looped = median_seconds(loop, repeats=3, warmup=1)
    return "per-position loop / one batched pass", looped / batched, f"T={length}, width {width}"


def run() -> list[tuple[str, float, str]]:
    return [factored_vs_dense(), every_position_vs_loop()]
