"""Implicit learning dynamics of docs/theory.md §6: the context consumed one token at a time.

Notation: a = A(x) is the query's contextual output alone, A_i = A(c_1..c_i, x) after the first i context
tokens (A_0 = a). The prefix updates ΔW_i = W (A_i − a) a^T / ||a||^2 share their right factor, so the
whole trajectory W_i = W + ΔW_i is stored as n left factors and one right factor. In a chain of blocks
(a real model's layers above the first) the reference moves with the prefix; `consecutive_differences`,
`step_norms` and `gradient_steps` handle trajectories whose right factors differ.
"""

from __future__ import annotations

from dataclasses import dataclass

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


# --- trajectories whose right factors differ (docs/theory.md §6, a chain's layers above the first) ---------


def _check_trajectory(updates: LowRankUpdate) -> None:
    if len(updates.batch_shape) == 0 or updates.batch_shape[-1] < 2:
        raise ImplicitICLError(
            f"a trajectory needs at least 2 entries on its last batch dimension, got batch shape {updates.batch_shape}"
        )


def consecutive_differences(updates: LowRankUpdate) -> LowRankUpdate:
    """ΔW_{j+1} − ΔW_j for consecutive entries of a trajectory, still factored.

    updates: U [..., P, out, k], V [..., P, in, k] (P ≥ 2 entries, e.g. the patches of growing prefixes).
    Returns U [..., P−1, out, 2k], V [..., P−1, in, 2k] holding (U_{j+1} − U_j) V_{j+1}^T + U_j (V_{j+1} − V_j)^T.
    When the right factors differ the difference has rank up to 2k; because its factors are themselves
    differences, its Gram-matrix norm carries no ||A||² + ||B||² − 2<A, B> cancellation when A ≈ B.
    """
    _check_trajectory(updates)
    U, V = updates.U, updates.V
    return LowRankUpdate(
        torch.cat([U[..., 1:, :, :] - U[..., :-1, :, :], U[..., :-1, :, :]], -1),
        torch.cat([V[..., 1:, :, :], V[..., 1:, :, :] - V[..., :-1, :, :]], -1),
    )


def step_norms(updates: LowRankUpdate) -> Tensor:
    """||ΔW_{j+1} − ΔW_j||_F from the factors for a trajectory [..., P, ·, k] -> [..., P−1]; right factors may differ."""
    if updates.rank != 1:
        return consecutive_differences(updates).norm()
    return rank_one_series(updates).increments.sqrt()


@dataclass(frozen=True)
class GradientSteps:
    """W_{j+1} − W_j = step_j + remainder_j for a trajectory of rank-1 updates ΔW_j = u_j v_j^T (theory.md §6).

    step_j = −h_{j+1} ∇_W L_j: the online-gradient-descent step of §6 with the reference a_{j+1} = v_{j+1} /
    ||v_{j+1}||² of the later entry, h_{j+1} = 1/||a_{j+1}||² and L_j(W) = trace(Δ_j^T W), Δ_j = W_0 (A_j − A_{j+1})
    a_{j+1}^T. remainder_j = ΔW'_j − ΔW_j, where ΔW'_j is the update prefix j would have with the reference
    a_{j+1}: what the moving reference adds. It is zero when all entries share their reference (one block, or a
    chain's first layer under relative positions), where the §6 identity W_{j+1} = W_j − h ∇L_j holds as it is.

    step, remainder: [..., P−1] updates of rank 1 and 2; learning_rates: h_j for every entry [..., P].
    """

    step: LowRankUpdate
    remainder: LowRankUpdate
    learning_rates: Tensor


def gradient_steps(weight: Tensor, updates: LowRankUpdate) -> GradientSteps:
    """Split a trajectory's increments into the §6 gradient step and the moving-reference remainder.

    weight W_0: [out, in]; updates: rank-1, U [..., P, out, 1], V [..., P, in, 1] with ΔW_j = W_0 (A_j − a_j)
    a_j^T / ||a_j||² (A_j: what W reads with prefix j, a_j: without it). Only W_0, u_j and v_j are needed:
    a_j = v_j / ||v_j||² and W_0 A_j = W_0 a_j + u_j.
    """
    u, v = _rank_one_factors(updates, "the gradient-descent split")
    reference, learning_rates = _references(v)
    moved = _moved(weight, reference)
    step = LowRankUpdate.rank_one(u[..., 1:, :] - u[..., :-1, :] - moved, v[..., 1:, :])
    remainder = LowRankUpdate(
        torch.stack([moved, u[..., :-1, :]], -1), torch.stack([v[..., 1:, :], v[..., 1:, :] - v[..., :-1, :]], -1)
    )
    return GradientSteps(step, remainder, learning_rates)


def gradient_step_norms(weight: Tensor, updates: LowRankUpdate) -> tuple[Tensor, Tensor]:
    """(||step_j||_F, ||remainder_j||_F) [..., P−1] of `gradient_steps`, from dot products of the factors
    without building the split (the dynamics' series need only its norms)."""
    series = rank_one_series(updates, weight)
    return series.steps.sqrt(), series.remainders.sqrt()


@dataclass(frozen=True)
class RankOneSeries:
    """Squared norms of a rank-1 trajectory ΔW_j = u_j v_j^T, entries on the last batch dimension (squared, so
    that the blocks of a stacked matrix add up). updates: ||ΔW_j||² and with_last: <ΔW_j, ΔW_last> [..., P];
    increments: ||ΔW_{j+1} − ΔW_j||², steps and remainders: ||step_j||², ||remainder_j||² of `gradient_steps`
    [..., P−1] (None without W_0); learning_rates: h_j = ||v_j||² [..., P]."""

    updates: Tensor
    with_last: Tensor
    increments: Tensor
    steps: Tensor | None
    remainders: Tensor | None
    learning_rates: Tensor


def rank_one_series(
    updates: LowRankUpdate, weight: Tensor | None = None, outputs: Tensor | None = None
) -> RankOneSeries:
    """Every series of a rank-1 trajectory from one set of dot products of its factors, never dense.

    updates: U [..., P, out, 1], V [..., P, in, 1]; for the gradient split (neither given: no split) either
    weight W_0 [out, in] or outputs [..., P, out] = W_0 A_j (+ any bias, which cancels) where the caller recorded
    them: the step_j = W_0 (A_{j+1} − A_j) is then their difference, with no product with W_0. Differences are
    taken on the factors before any dot product, so the increments carry no ||A||² + ||B||² − 2<A, B>
    cancellation."""
    u, v = _rank_one_factors(updates, "the series of a trajectory")
    squared_u, squared_v = _squared_norm(u), _squared_norm(v)
    earlier, later = u[..., :-1, :], v[..., 1:, :]
    du, dv = u[..., 1:, :] - earlier, later - v[..., :-1, :]
    # ΔW_{j+1} − ΔW_j = du v_{j+1}^T + u_j dv^T and the remainder moved v_{j+1}^T + u_j dv^T share their second term
    second, cross = squared_u[..., :-1] * _squared_norm(dv), _dot(later, dv)
    rates_after = squared_v[..., 1:]
    steps = remainders = None
    if weight is not None or outputs is not None:
        moved, step = _moved_and_step(weight, u, du, v, outputs)
        steps = _squared_norm(step) * rates_after
        remainders = (_squared_norm(moved) * rates_after + second + 2 * _dot(moved, earlier) * cross).clamp_min(0)
    return RankOneSeries(
        updates=squared_u * squared_v,
        with_last=_dot(u, u[..., -1:, :]) * _dot(v, v[..., -1:, :]),
        increments=(_squared_norm(du) * rates_after + second + 2 * _dot(du, earlier) * cross).clamp_min(0),
        steps=steps,
        remainders=remainders,
        learning_rates=squared_v,
    )


def _rank_one_factors(updates: LowRankUpdate, what: str) -> tuple[Tensor, Tensor]:
    """u_j [..., P, out] and v_j [..., P, in] of a rank-1 trajectory."""
    if updates.rank != 1:
        raise ImplicitICLError(f"{what} takes rank-1 updates (one reference each), got rank {updates.rank}")
    _check_trajectory(updates)
    return updates.U[..., 0], updates.V[..., 0]


def _references(v: Tensor) -> tuple[Tensor, Tensor]:
    """The references a_j = v_j / ||v_j||² [..., P, in] and h_j = ||v_j||² = 1/||a_j||² [..., P]."""
    learning_rates = safe_squared_norm("a right factor v_j", v)
    return v / learning_rates.unsqueeze(-1), learning_rates


def _dot(x: Tensor, y: Tensor) -> Tensor:
    return (x * y).sum(-1)


def _squared_norm(x: Tensor) -> Tensor:
    """||x||² over the last dimension, read once without a temporary the size of x."""
    return torch.linalg.vector_norm(x, dim=-1).square()


def _moved_and_step(
    weight: Tensor | None, u: Tensor, du: Tensor, v: Tensor, outputs: Tensor | None
) -> tuple[Tensor, Tensor]:
    """moved_j = W_0 (a_j − a_{j+1}) and step_j = du_j − moved_j = W_0 (A_{j+1} − A_j), [..., P−1, out]: the
    step from the recorded outputs W_0 A_j where given, else moved from the product with W_0."""
    if outputs is not None:
        check_last_dim("the outputs W_0 A_j", outputs, u.shape[-1])
        outputs = outputs.to(u.dtype)
        step = outputs[..., 1:, :] - outputs[..., :-1, :]
        return du - step, step
    moved = _moved(weight, _references(v)[0])
    return moved, du - moved


def _moved(weight: Tensor, reference: Tensor) -> Tensor:
    """W_0 (a_j − a_{j+1}) [..., P−1, out] from the references a_j [..., P, in] (in W's own dtype: a float32
    model's matrix need not be copied to float64; the result in the references' dtype)."""
    check_last_dim("the right factors", reference, weight.shape[1])
    return ((reference[..., :-1, :] - reference[..., 1:, :]).to(weight.dtype) @ weight.T).to(reference.dtype)
