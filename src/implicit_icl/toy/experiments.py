"""The measurements of docs/experiments.md §2 on a toy model, batched over prompts.

(a) `patch_agreement`: prediction with the prompt vs the query alone through W + ΔW, per checkpoint;
(b) `increment_norms_by_token`: ||ΔW_{i+1} − ΔW_i|| as the context is consumed token by token;
(c, d) live in `finetune.py`; the error-vs-k curves against the baselines from `squared_errors`.
All "prefix" quantities use A(c_1..c_i, x): the block run on the first i examples followed by the query.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from implicit_icl.theory import ImplicitUpdate, gradient_descent_errors, increment_norms, prefix_updates
from implicit_icl.toy.baselines import all_baselines
from implicit_icl.toy.block import BlockStates, ContextualBlock
from implicit_icl.toy.data import Prompts
from implicit_icl.toy.model import ToyTransformer

# Prompts per forward pass when evaluating: a whole test set at once allocates attention scores of
# B·H·T² floats per pass (hundreds of MB in float64), which the allocator maps and unmaps every time.
PROMPTS_PER_PASS = 32


def in_chunks(measure: Callable[[Prompts], Tensor], prompts: Prompts) -> Tensor:
    """measure(prompts) -> [..., B], run on PROMPTS_PER_PASS prompts at a time and concatenated on the last
    dimension."""
    parts = [measure(prompts.subset(slice(s, s + PROMPTS_PER_PASS))) for s in range(0, prompts.size, PROMPTS_PER_PASS)]
    return torch.cat(parts, dim=-1)


@torch.no_grad()
def predictions_by_k(model: ToyTransformer, prompts: Prompts) -> Tensor:
    """The model's prediction of y_q after its first k examples, k = 0..N: [B, N+1]."""

    def by_k(chunk: Prompts) -> Tensor:  # [N+1, b]
        return torch.stack([model.predict(chunk.tokens(k)) for k in range(chunk.context_length + 1)])

    return in_chunks(by_k, prompts).T


@torch.no_grad()
def full_context_errors(model: ToyTransformer, prompts: Prompts, noise: float) -> dict[str, Tensor]:
    """Squared error of y_q divided by d at k = N only, per prompt ([B]), for the model and every baseline:
    one forward pass per prompt, so it affords the many prompts a paired comparison of close estimators
    needs."""
    predictions = {"model": in_chunks(lambda chunk: model.predict(chunk.tokens()), prompts)}
    for name, estimator in all_baselines(noise).items():
        predictions[name] = estimator(prompts.inputs, prompts.labels, prompts.query)
    return {name: (p - prompts.query_label).pow(2) / prompts.dim for name, p in predictions.items()}


@torch.no_grad()
def squared_errors(model: ToyTransformer, prompts: Prompts, noise: float) -> dict[str, Tensor]:
    """Squared error of y_q divided by d, per prompt and k = 0..N ([B, N+1]), for the model and every
    baseline: the raw material of the error-vs-k curves (and of paired comparisons between estimators)."""
    squared = {"model": (predictions_by_k(model, prompts) - prompts.query_label[:, None]).pow(2)}
    for name, estimator in all_baselines(noise).items():
        columns = [
            estimator(prompts.inputs[:, :k], prompts.labels[:, :k], prompts.query)
            for k in range(prompts.context_length + 1)
        ]
        squared[name] = (torch.stack(columns, dim=1) - prompts.query_label[:, None]).pow(2)
    return {name: errors / prompts.dim for name, errors in squared.items()}


@torch.no_grad()
def patch_agreement(model: ToyTransformer, prompts: Prompts) -> dict:
    """One checkpoint: losses with the prompt, through W + ΔW on the query alone, and unpatched alone.

    Run it on a float64 model and prompts for the exactness numbers. Relative difference: the largest
    |patched − with prompt| over prompts divided by the largest |with prompt|.
    """

    def three_ways(chunk: Prompts) -> Tensor:  # [3, b]
        tokens, query = chunk.tokens(), chunk.query_token()
        patched = model.predict_patched(query, model.implicit_updates(tokens))
        return torch.stack([model.predict(tokens), patched, model.predict(query[:, None])])

    with_prompt, patched, alone = in_chunks(three_ways, prompts)
    difference = (patched - with_prompt).abs().max()
    target = prompts.query_label
    return {
        "loss_with_prompt": (with_prompt - target).pow(2).mean().item(),
        "loss_patched": (patched - target).pow(2).mean().item(),
        "loss_query_alone_unpatched": (alone - target).pow(2).mean().item(),
        "max_abs_diff": difference.item(),
        "max_rel_diff": (difference / with_prompt.abs().max()).item(),
    }


@torch.no_grad()
def rank_one_sigma_ratio(model: ToyTransformer, prompts: Prompts) -> float:
    """Largest σ2/σ1 of the dense ΔW of every block over the prompts (0 for an exact rank-1 update)."""
    ratios = []
    for update in model.implicit_updates(prompts.tokens()):
        singular = torch.linalg.svdvals(update.weight.dense())  # [B, min(out, in)]
        ratios.append((singular[:, 1] / singular[:, 0]).max())
    return torch.stack(ratios).max().item()


@torch.no_grad()
def prefix_states(block: ContextualBlock, prompts: Prompts) -> tuple[BlockStates, BlockStates]:
    """The block's states at the query after the first i examples, i = 1..N ([B, N, ·]), and with the
    query alone ([B, ·])."""
    with_prefix = [block.states(prompts.tokens(i)) for i in range(1, prompts.context_length + 1)]
    alone = block.states(prompts.query_token()[:, None])
    mlp_inputs = torch.stack([states.mlp_input[:, -1] for states in with_prefix], dim=1)
    if alone.residual is None:
        return BlockStates(None, mlp_inputs), BlockStates(None, alone.mlp_input[:, -1])
    residuals = torch.stack([states.residual[:, -1] for states in with_prefix], dim=1)
    return BlockStates(residuals, mlp_inputs), BlockStates(alone.residual[:, -1], alone.mlp_input[:, -1])


@torch.no_grad()
def prefix_update(block: ContextualBlock, prompts: Prompts) -> ImplicitUpdate:
    """ΔW_i (and for a skip block the output shift) of the first i examples, i = 1..N: factors [B, N, ·],
    built by the library's `prefix_updates` from the MLP inputs with prefixes and alone."""
    with_prefix, alone = prefix_states(block, prompts)
    weight = prefix_updates(block.first_layer.weight, with_prefix.mlp_input, alone.mlp_input)
    if alone.residual is None:
        return ImplicitUpdate(weight)
    return ImplicitUpdate(weight, with_prefix.residual - alone.residual[:, None])


@torch.no_grad()
def patched_prefix_predictions(block: ContextualBlock, prompts: Prompts, update: ImplicitUpdate) -> Tensor:
    """T_{W+ΔW_i}(x_q) for i = 1..N, the query alone under each prefix update: [B, N]."""
    lone_query = prompts.query_token()[:, None, None].expand(-1, prompts.context_length, 1, -1)
    return block(lone_query, update)[..., 0, -1]


def increment_norms_by_token(block: ContextualBlock, prompts: Prompts) -> Tensor:
    """||W_{i+1} − W_i||_F for i = 0..N−1 (entry 0 is ||ΔW_1||): [B, N]."""
    return increment_norms(prefix_update(block, prompts).weight)


@torch.no_grad()
def gd_identity_error(block: ContextualBlock, prompts: Prompts) -> float:
    """Max error of the Proposition W_{i+1} = W_i − h ∇L_i(W_i) over a few prompts (dense; keep B small)."""
    with_prefix, alone = prefix_states(block, prompts)
    weight = block.first_layer.weight
    with torch.enable_grad():
        errors = [
            gradient_descent_errors(weight, with_prefix.mlp_input[b], alone.mlp_input[b]).max()
            for b in range(prompts.size)
        ]
    return torch.stack(errors).max().item()
