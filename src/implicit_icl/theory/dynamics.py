"""Implicit learning dynamics of docs/theory.md §6: the context consumed one token at a time.

Notation: a = A(x) is the query's contextual output alone, A_i = A(c_1..c_i, x) after the first i context
tokens (A_0 = a). The prefix updates ΔW_i = W (A_i − a) a^T / ||a||^2 share their right factor, so the
whole trajectory W_i = W + ΔW_i is stored as n left factors and one right factor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_icl.errors import ImplicitICLError, check_finite, check_last_dim, safe_squared_norm
from implicit_icl.theory.low_rank import LowRankUpdate
from implicit_icl.theory.rank_one import rank_one_update


def _check_sequence(name: str, sequence: Tensor, query: Tensor) -> None:
    if sequence.dim() != 2 or sequence.shape[0] == 0:
        raise ImplicitICLError(f"{name} must be a non-empty [n, in] matrix, got shape {tuple(sequence.shape)}")
    check_last_dim(name, sequence, query.shape[-1])


def prefix_updates(weight: Tensor, attention_prefixes: Tensor, attention_query: Tensor) -> LowRankUpdate:
    """ΔW(c_1..c_i) for every prefix i = 1..n.

    weight: [out, in]; attention_prefixes: [..., n, in], row i−1 = A(c_1..c_i, x); attention_query A(x):
    [..., in]. Leading dimensions are independent prompts. Returns a batched rank-1 update with U: [..., n, out, 1]
    and V: [..., n, in, 1] (the same right factor n times).
    """
    if attention_prefixes.dim() < 2 or attention_prefixes.shape[-2] == 0:
        raise ImplicitICLError(
            f"attention_prefixes must be a non-empty [..., n, in] tensor, got shape {tuple(attention_prefixes.shape)}"
        )
    check_last_dim("attention_prefixes", attention_prefixes, attention_query.shape[-1])
    reference = attention_query.unsqueeze(-2).expand_as(attention_prefixes)
    return rank_one_update(weight, attention_prefixes, reference)


def increment_norms(updates: LowRankUpdate) -> Tensor:
    """||W_{i+1} − W_i||_F for i = 0..n−1 (W_0 = W) from prefix updates with a shared right factor.

    updates: U [..., n, out, 1], V [..., n, in, 1] as returned by `prefix_updates`. Returns [..., n]; entry 0 is
    ||ΔW_1||.
    """
    u, v = updates.U[..., 0], updates.V[..., 0]
    steps = torch.diff(u, dim=-2, prepend=torch.zeros_like(u[..., :1, :]))
    return steps.norm(dim=-1) * v.norm(dim=-1)


def gradient_descent_errors(weight: Tensor, attention_prefixes: Tensor, attention_query: Tensor) -> Tensor:
    """Check the Proposition: W_{i+1} = W_i − h ∇_W L_i(W_i) for i = 0..n−1.

    h = 1/||A(x)||^2 and L_i(W) = trace(Δ_i^T W) with Δ_i = W_0 (A_i − A_{i+1}) A(x)^T. The gradient is
    taken by autograd on the loss itself, and the step compared with the closed-form W_{i+1}.
    Builds dense [out, in] matrices, so it is meant for checks, not for large layers.
    Returns the max absolute error of each step: [n].
    """
    updates = prefix_updates(weight, attention_prefixes, attention_query)
    with torch.no_grad():
        trajectory = weight + torch.cat([torch.zeros_like(updates.dense()[:1]), updates.dense()])
    states = torch.cat([attention_query[None], attention_prefixes])
    learning_rate = 1.0 / attention_query.pow(2).sum()
    errors = []
    for i in range(attention_prefixes.shape[0]):
        current = trajectory[i].clone().requires_grad_(True)
        target = weight.detach() @ torch.outer(states[i] - states[i + 1], attention_query)
        loss = (target * current).sum()  # trace(Δ_i^T W)
        (gradient,) = torch.autograd.grad(loss, current)
        stepped = current.detach() - learning_rate * gradient
        errors.append((stepped - trajectory[i + 1]).abs().max())
    return torch.stack(errors)


def factorised_updates(attention_suffixes: Tensor, attention_query: Tensor) -> LowRankUpdate:
    """The one-token-at-a-time factorisation W_n = W_0 (I + h_1 A_1) … (I + h_n A_n).

    attention_suffixes: [n, in], row i−1 = B_i = A(c_i..c_n, x); attention_query B_{n+1} = A(x): [in].
    Factor i acts on the input space: I + u_i v_i^T with u_i = B_i − B_{i+1} and
    v_i = B_{i+1} / ||B_{i+1}||^2, so that it maps B_{i+1} to B_i. Returns rank-1 factors U, V: [n, in, 1].
    """
    _check_sequence("attention_suffixes", attention_suffixes, attention_query)
    check_finite("attention_suffixes", attention_suffixes)
    following = torch.cat([attention_suffixes[1:], attention_query[None]])
    squared = safe_squared_norm("a suffix output A(c_(i+1)..c_n, x)", following)
    return LowRankUpdate.rank_one(attention_suffixes - following, following / squared.unsqueeze(-1))


def apply_factorised(weight: Tensor, factors: LowRankUpdate, x: Tensor) -> Tensor:
    """W_0 (I + u_1 v_1^T) … (I + u_n v_n^T) x, right to left, without building a matrix.

    weight: [out, in]; factors: U, V [n, in, 1]; x: [..., in] -> [..., out].
    """
    for i in reversed(range(factors.batch_shape[0])):
        x = x + factors[i].apply(x)
    return x @ weight.T
