"""A plain causal multi-head self-attention: the prototype contextual layer of [D]."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class CausalSelfAttention(nn.Module):
    """Softmax self-attention without positional encoding, masked so position t reads positions ≤ t.

    [..., T, d_in] -> [..., T, d_out]. Any leading dimensions are independent sequences.
    """

    def __init__(self, d_in: int, d_out: int, n_heads: int = 1, head_dim: int | None = None) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = head_dim or max(1, d_out // n_heads)
        inner = n_heads * self.head_dim
        self.query = nn.Linear(d_in, inner, bias=False)
        self.key = nn.Linear(d_in, inner, bias=False)
        self.value = nn.Linear(d_in, inner, bias=False)
        self.output = nn.Linear(inner, d_out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        *batch, length, _ = x.shape

        def heads(t: Tensor) -> Tensor:  # [..., T, H*hd] -> [..., H, T, hd]
            return t.reshape(*batch, length, self.n_heads, self.head_dim).transpose(-2, -3)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        weights = scores.masked_fill(future, float("-inf")).softmax(-1)
        mixed = (weights @ v).transpose(-2, -3).reshape(*batch, length, -1)
        return self.output(mixed)
