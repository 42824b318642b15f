"""In-context linear regression prompts (docs/experiments.md §1).

A prompt draws w ~ N(0, I_d), inputs x_1..x_N, x_q ~ N(0, I_d) and labels y = <w, x> + σ ε. Each example is
one token [x_i ; y_i] ∈ R^{d+1}; the query token is [x_q ; 0], so its label never enters the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from implicit_icl.errors import ImplicitICLError


@dataclass(frozen=True)
class Prompts:
    """A batch of B prompts with N examples each."""

    inputs: Tensor  # x_1..x_N: [B, N, d]
    labels: Tensor  # y_1..y_N: [B, N]
    query: Tensor  # x_q: [B, d]
    query_label: Tensor  # y_q: [B]
    task: Tensor  # w: [B, d]

    @property
    def size(self) -> int:
        return self.inputs.shape[0]

    @property
    def context_length(self) -> int:
        return self.inputs.shape[1]

    @property
    def dim(self) -> int:
        return self.inputs.shape[2]

    def example_tokens(self) -> Tensor:
        """[x_i ; y_i] for every example: [B, N, d+1]."""
        return torch.cat([self.inputs, self.labels.unsqueeze(-1)], dim=-1)

    def query_token(self) -> Tensor:
        """[x_q ; 0]: [B, d+1]."""
        return torch.cat([self.query, torch.zeros_like(self.query[:, :1])], dim=-1)

    def tokens(self, k: int | None = None) -> Tensor:
        """The first k examples then the query: [B, k+1, d+1] (k = N by default)."""
        k = self.context_length if k is None else k
        if not 0 <= k <= self.context_length:
            raise ImplicitICLError(f"k = {k} examples asked of prompts that hold {self.context_length}; use 0..N")
        return torch.cat([self.example_tokens()[:, :k], self.query_token()[:, None]], dim=1)

    def to(self, dtype: torch.dtype) -> Prompts:
        return Prompts(*(t.to(dtype) for t in (self.inputs, self.labels, self.query, self.query_label, self.task)))

    def subset(self, index: Tensor | slice) -> Prompts:
        return Prompts(*(t[index] for t in (self.inputs, self.labels, self.query, self.query_label, self.task)))

    def shuffled_labels(self, generator: torch.Generator) -> Prompts:
        """The negative control: each prompt's labels permuted among its own examples, so that x_i and y_i
        no longer share a task (the query label is left as is)."""
        order = torch.rand(self.labels.shape, generator=generator).argsort(dim=-1)
        return Prompts(self.inputs, self.labels.gather(1, order), self.query, self.query_label, self.task)


def sample_prompts(
    n_prompts: int,
    dim: int,
    context_length: int,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Prompts:
    """Fresh tasks, inputs and labels: B = n_prompts prompts of N = context_length examples in R^dim."""
    if n_prompts < 1 or dim < 1 or context_length < 1:
        raise ImplicitICLError(f"need n_prompts, dim and context_length ≥ 1, got {n_prompts}, {dim}, {context_length}")
    if noise < 0:
        raise ImplicitICLError(f"the label noise σ must be ≥ 0, got {noise}")

    def normal(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    task = normal(n_prompts, dim)
    inputs, query = normal(n_prompts, context_length, dim), normal(n_prompts, dim)
    labels = (inputs @ task.unsqueeze(-1)).squeeze(-1) + noise * normal(n_prompts, context_length)
    query_label = (query * task).sum(-1) + noise * normal(n_prompts)
    return Prompts(inputs, labels, query, query_label, task).to(dtype)
