"""Experiments (c) and (d): explicit SGD fine-tuning of W next to the implicit updates ΔW_i.

Fine-tuning follows the implicit dynamics' one-token-per-step schedule: starting from W, example j is fed
alone as the query token [x_j ; 0] with target y_j, and one SGD step of size η is taken on the squared error
(y_j − ŷ_j)² with respect to W only. After i steps the fine-tuned update is D_i = W_i − W (dense, rank ≤ i);
it is compared with ΔW_i (the first i examples as context) by the test loss on x_q alone and by the
normalised Frobenius inner product <ΔW_i, D_i>_F / (||ΔW_i||_F ||D_i||_F).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from implicit_icl.errors import ImplicitICLError
from implicit_icl.theory import LowRankUpdate
from implicit_icl.toy.block import ContextualBlock
from implicit_icl.toy.data import Prompts


@dataclass(frozen=True)
class FinetuneRun:
    """Per prompt and step i = 1..N: test loss on x_q alone after i SGD steps, and the alignment of D_i
    with the implicit ΔW_i (when given): [B, N] each."""

    test_loss: Tensor
    alignment: Tensor | None


@contextmanager
def _dense_added(linear: nn.Linear, delta: Tensor):
    """Run `linear` as W + D_b for sequence b: delta [B, out, in] meets inputs [B, T, in]."""
    handle = linear.register_forward_hook(lambda module, inputs, output: output + inputs[0] @ delta.transpose(1, 2))
    try:
        yield
    finally:
        handle.remove()


def _lone_predictions(block: ContextualBlock, tokens: Tensor, delta: Tensor) -> Tensor:
    """Each token alone, [B, d+1], through the block with W + D_b -> predictions [B]."""
    with _dense_added(block.first_layer, delta):
        return block(tokens[:, None])[:, 0, -1]


def finetune(
    block: ContextualBlock, prompts: Prompts, step_size: float | Tensor, implicit: LowRankUpdate | None = None
) -> FinetuneRun:
    """Online SGD on W over the N examples in order, batched over prompts (each prompt its own copy of W).

    step_size: one η, or one per prompt [B]. implicit: the prefix updates ΔW_i with factors [B, N, ·], to
    measure the alignment at every step.
    """
    weight = block.first_layer.weight
    delta = torch.zeros(prompts.size, *weight.shape, dtype=weight.dtype)
    step_size = torch.as_tensor(step_size, dtype=weight.dtype)
    if step_size.numel() not in (1, prompts.size):
        raise ImplicitICLError(
            f"got {step_size.numel()} SGD step sizes for {prompts.size} prompts; give one, or one per prompt"
        )
    step_size = step_size.reshape(-1).expand(prompts.size)[:, None, None]
    lone_examples = torch.cat([prompts.inputs, torch.zeros_like(prompts.labels)[..., None]], dim=-1)
    losses, alignments = [], []
    for j in range(prompts.context_length):
        delta.requires_grad_(True)
        error = _lone_predictions(block, lone_examples[:, j], delta) - prompts.labels[:, j]
        (gradient,) = torch.autograd.grad(error.pow(2).sum(), delta)  # prompts are independent: per-prompt grads
        delta = (delta - step_size * gradient).detach()
        with torch.no_grad():
            prediction = _lone_predictions(block, prompts.query_token(), delta)
        losses.append((prediction - prompts.query_label).pow(2))
        if implicit is not None:
            alignments.append(_cosine(implicit[:, j], delta))
    return FinetuneRun(torch.stack(losses, 1), torch.stack(alignments, 1) if alignments else None)


def _cosine(update: LowRankUpdate, dense: Tensor) -> Tensor:
    """<U Vᵀ, D>_F / (||U Vᵀ||_F ||D||_F) with <U Vᵀ, D>_F = trace(Uᵀ D V), batched: [B]."""
    inner = (update.U.transpose(-1, -2) @ dense @ update.V).diagonal(dim1=-2, dim2=-1).sum(-1)
    return inner / (update.norm() * dense.flatten(1).norm(dim=-1)).clamp_min(torch.finfo(dense.dtype).tiny)


def choose_step_size(block: ContextualBlock, held_out: Prompts, grid: list[float]) -> tuple[float, list[float]]:
    """The rule: the η of the grid with the lowest test loss averaged over i = 1..N on held-out tasks
    (diverging steps count as infinite). Returns η and the mean loss of every grid point.

    The whole grid runs as one batch: the held-out prompts repeated once per step size.
    """
    if not grid:
        raise ImplicitICLError("the step-size grid is empty; give at least one SGD step size")
    repeated = held_out.subset(torch.arange(held_out.size).repeat(len(grid)))
    step_sizes = torch.tensor(grid, dtype=torch.float64).repeat_interleave(held_out.size)
    losses = finetune(block, repeated, step_sizes).test_loss.reshape(len(grid), -1).double().mean(1)
    scores = torch.where(losses.isfinite(), losses, torch.inf).tolist()
    return grid[min(range(len(grid)), key=scores.__getitem__)], scores
