"""docs/theory.md §6 for trajectories whose reference moves (a chain's layers above the first): increments of
rank up to 2 from the factors, and the split of each increment into the gradient step and the remainder."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from implicit_icl import ImplicitICLError
from implicit_icl.theory import (
    LowRankUpdate,
    consecutive_differences,
    gradient_step_norms,
    gradient_steps,
    increment_norms,
    prefix_updates,
    rank_one_series,
    rank_one_update,
    step_norms,
)

property_settings = settings(max_examples=30, deadline=None)


def trajectory(seed: int, out: int, inp: int, entries: int, shared: bool):
    """W_0 [out, in], what W reads with each prefix A_j [P, in], the references a_j [P, in] (one, repeated, if
    shared) and the exact updates ΔW_j = W_0 (A_j − a_j) a_j^T / ||a_j||²."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inp, generator=generator, dtype=torch.float64)
    context = torch.randn(entries, inp, generator=generator, dtype=torch.float64)
    reference = torch.randn(1 if shared else entries, inp, generator=generator, dtype=torch.float64)
    reference = reference.expand(entries, inp)
    return weight, context, reference, rank_one_update(weight, context, reference)


@property_settings
@given(
    seed=st.integers(0, 10_000),
    out=st.integers(1, 6),
    inp=st.integers(1, 6),
    entries=st.integers(2, 7),
    rank=st.integers(1, 3),
)
def test_consecutive_differences_equal_the_dense_ones(seed, out, inp, entries, rank):
    generator = torch.Generator().manual_seed(seed)
    updates = LowRankUpdate(
        torch.randn(2, entries, out, rank, generator=generator, dtype=torch.float64),
        torch.randn(2, entries, inp, rank, generator=generator, dtype=torch.float64),
    )
    differences = consecutive_differences(updates)
    assert differences.rank == 2 * rank and differences.batch_shape == (2, entries - 1)
    dense = updates.dense()
    torch.testing.assert_close(differences.dense(), dense.diff(dim=1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(step_norms(updates), torch.linalg.matrix_norm(dense.diff(dim=1)), rtol=1e-9, atol=1e-12)


@property_settings
@given(seed=st.integers(0, 10_000), out=st.integers(1, 6), inp=st.integers(1, 6), entries=st.integers(2, 7))
def test_with_a_shared_reference_step_norms_are_the_increment_norms(seed, out, inp, entries):
    weight, context, reference, _ = trajectory(seed, out, inp, entries, shared=True)
    updates = prefix_updates(weight, context, reference[0])
    torch.testing.assert_close(step_norms(updates), increment_norms(updates)[1:], rtol=1e-9, atol=1e-12)


def test_tiny_increments_keep_their_relative_precision():
    """A ≈ B: ||A||² + ||B||² − 2<A, B> would lose ~1e-2 of a 1e-7 increment; the factored differences keep it
    to float64 rounding (the float64 dense difference, exact to ~1e-16 ||ΔW|| per entry, is the reference)."""
    weight, context, reference, first = trajectory(4, 40, 30, 1, shared=False)
    generator = torch.Generator().manual_seed(1)
    nudged_context = context + 1e-7 * torch.randn(context.shape, generator=generator, dtype=torch.float64)
    nudged_reference = reference + 1e-7 * torch.randn(reference.shape, generator=generator, dtype=torch.float64)
    second = rank_one_update(weight, nudged_context, nudged_reference)
    updates = LowRankUpdate(torch.cat([first.U, second.U]), torch.cat([first.V, second.V]))
    exact = torch.linalg.matrix_norm(second.dense()[0] - first.dense()[0])
    assert abs(step_norms(updates)[0] / exact - 1) < 1e-7


@property_settings
@given(
    seed=st.integers(0, 10_000),
    out=st.integers(1, 6),
    inp=st.integers(1, 6),
    entries=st.integers(2, 7),
    shared=st.booleans(),
)
def test_increments_split_into_the_gradient_step_and_the_remainder(seed, out, inp, entries, shared):
    weight, context, reference, updates = trajectory(seed, out, inp, entries, shared)
    split = gradient_steps(weight, updates)
    torch.testing.assert_close(split.learning_rates, 1 / reference.pow(2).sum(-1), rtol=1e-12, atol=0)
    increments = updates.dense().diff(dim=0)
    torch.testing.assert_close(split.step.dense() + split.remainder.dense(), increments, rtol=1e-9, atol=1e-10)
    # the step is −h ∇L_j of the linear loss L_j(W) = trace(Δ_j^T W), Δ_j = W_0 (A_j − A_{j+1}) a_{j+1}^T, by autograd
    for j in range(entries - 1):
        current = (weight + updates.dense()[j]).clone().requires_grad_(True)
        gradient_of_loss = weight @ torch.outer(context[j] - context[j + 1], reference[j + 1])
        (gradient,) = torch.autograd.grad((gradient_of_loss * current).sum(), current)
        torch.testing.assert_close(
            -split.learning_rates[j + 1] * gradient, split.step.dense()[j], rtol=1e-9, atol=1e-10
        )
    # one reference for every entry: nothing remains, the §6 identity W_{j+1} = W_j − h ∇L_j holds as it is
    scale = 1 + increments.abs().max()
    remainder = split.remainder.dense().abs().max()
    assert (remainder <= 1e-12 * scale) if shared else (remainder > 1e-6 * scale)
    # the norms from dot products of the factors (what the dynamics' series use) against the built split's
    step_norm, remainder_norm = gradient_step_norms(weight, updates)
    torch.testing.assert_close(step_norm, torch.linalg.matrix_norm(split.step.dense()), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(remainder_norm, torch.linalg.matrix_norm(split.remainder.dense()), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(step_norms(updates), torch.linalg.matrix_norm(increments), rtol=1e-9, atol=1e-12)
    # every series at once, the split also from W_0 A_j (+ a bias, which cancels) as the context-ful pass records it
    dense, bias = updates.dense(), torch.randn(out, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)  # noqa: E731
    for series in (rank_one_series(updates, weight), rank_one_series(updates, weight, context @ weight.T + bias)):
        close(series.updates, torch.linalg.matrix_norm(dense) ** 2)
        close(series.with_last, (dense * dense[-1]).sum((-2, -1)))
        close(series.increments, torch.linalg.matrix_norm(increments) ** 2)
        close(series.steps, torch.linalg.matrix_norm(split.step.dense()) ** 2)
        close(series.remainders, torch.linalg.matrix_norm(split.remainder.dense()) ** 2)
        close(series.learning_rates, split.learning_rates)
    assert rank_one_series(updates).steps is None


def test_trajectory_functions_refuse_what_they_cannot_take():
    weight, _, _, updates = trajectory(0, 3, 2, 3, shared=False)
    with pytest.raises(ImplicitICLError, match="at least 2 entries"):
        step_norms(updates[:1])
    with pytest.raises(ImplicitICLError, match="rank-1"):
        gradient_steps(weight, updates + updates)
    with pytest.raises(ImplicitICLError, match="last dimension"):
        gradient_steps(torch.ones(3, 5, dtype=torch.float64), updates)
