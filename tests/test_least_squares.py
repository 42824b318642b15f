"""The ridge fits of compiled patches (docs/theory.md §7) against dense closed forms, over random shapes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from implicit_icl.errors import ImplicitICLError
from implicit_icl.theory import LowRankUpdate
from implicit_icl.theory.least_squares import (
    best_rank_fit,
    relative_ridge,
    ridge_bias,
    ridge_objective,
    ridge_update,
    truncated,
)

property_settings = settings(max_examples=40, deadline=None)


def _data(seed, tokens, inp, out):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, out, generator=g, dtype=torch.float64), torch.randn(
        tokens, inp, generator=g, dtype=torch.float64
    )


@property_settings
@given(tokens=st.integers(1, 12), inp=st.integers(1, 9), out=st.integers(1, 7), ridge=st.floats(0.01, 10.0),
       seed=st.integers(0, 2**31))  # fmt: skip
def test_the_factored_fit_is_the_dense_normal_equation_solution(tokens, inp, out, ridge, seed):
    """Either side of the push-through identity (T ≤ in or T > in) gives D Z^T (Z Z^T + λ I)^{-1}, whose
    gradient (ΔW Z − D) Z^T + λ ΔW vanishes."""
    differences, inputs = _data(seed, tokens, inp, out)
    update = ridge_update(differences, inputs, ridge)
    assert update.rank == min(tokens, inp)
    D, Z = differences.T, inputs.T
    dense = D @ Z.T @ torch.linalg.inv(Z @ Z.T + ridge * torch.eye(inp, dtype=torch.float64))
    torch.testing.assert_close(update.dense(), dense, rtol=1e-9, atol=1e-9)
    gradient = (update.dense() @ Z - D) @ Z.T + ridge * update.dense()
    assert gradient.abs().max() < 1e-8 * (1 + dense.abs().max() * (Z.abs().max() ** 2 + ridge))


@property_settings
@given(inp=st.integers(1, 9), out=st.integers(1, 7), ridge=st.floats(0.0, 10.0), seed=st.integers(0, 2**31))
def test_one_token_gives_the_exact_rank_one_patch_shrunk_by_the_ridge(inp, out, ridge, seed):
    differences, inputs = _data(seed, 1, inp, out)
    d, z = differences[0], inputs[0]
    update = ridge_update(differences, inputs, ridge)
    torch.testing.assert_close(update.dense(), torch.outer(d, z) / (z @ z + ridge), rtol=1e-12, atol=1e-12)
    if ridge == 0:  # exact: the patched matrix maps z to what it mapped z_C to
        torch.testing.assert_close(update.apply(z), d, rtol=1e-12, atol=1e-12)


@property_settings
@given(tokens=st.integers(2, 12), inp=st.integers(1, 9), out=st.integers(1, 7), seed=st.integers(0, 2**31))
def test_ridge_zero_is_the_minimum_norm_solution_even_with_repeated_tokens(tokens, inp, out, seed):
    differences, inputs = _data(seed, tokens, inp, out)
    inputs[-1], differences[-1] = inputs[0], differences[0]  # a repeated token: a singular Gram matrix
    update = ridge_update(differences, inputs, 0.0)
    torch.testing.assert_close(update.dense(), differences.T @ torch.linalg.pinv(inputs.T), rtol=1e-8, atol=1e-8)


@property_settings
@given(tokens=st.integers(1, 12), inp=st.integers(1, 9), out=st.integers(1, 7), rank=st.integers(1, 10),
       seed=st.integers(0, 2**31))  # fmt: skip
def test_truncation_from_factors_is_the_dense_svd_truncation(tokens, inp, out, rank, seed):
    differences, inputs = _data(seed, tokens, inp, out)
    update = ridge_update(differences, inputs, 0.5)
    cut = truncated(update, rank)
    left, values, right_t = torch.linalg.svd(update.dense())
    keep = min(rank, values.numel())
    expected = (left[:, :keep] * values[:keep]) @ right_t[:keep]
    assert cut.rank == min(rank, out, inp, update.rank)
    torch.testing.assert_close(cut.dense(), expected, rtol=1e-9, atol=1e-9)


@property_settings
@given(tokens=st.integers(2, 12), inp=st.integers(2, 9), out=st.integers(2, 7), rank=st.integers(1, 6),
       ridge=st.floats(0.01, 5.0), seed=st.integers(0, 2**31))  # fmt: skip
def test_the_best_rank_fit_is_p_r_times_the_full_fit_and_never_worse_than_truncation(
    tokens, inp, out, rank, ridge, seed
):
    differences, inputs = _data(seed, tokens, inp, out)
    full = ridge_update(differences, inputs, ridge)
    best = best_rank_fit(full, inputs, ridge, rank)
    # second method: the top-r left singular vectors of ΔW* S^{1/2}, with S^{1/2} from an eigendecomposition
    S = inputs.T @ inputs + ridge * torch.eye(inp, dtype=torch.float64)
    values, vectors = torch.linalg.eigh(S)
    root = vectors @ torch.diag(values.sqrt()) @ vectors.T
    left = torch.linalg.svd(full.dense() @ root).U[:, : min(rank, out, full.rank)]
    torch.testing.assert_close(best.dense(), left @ left.T @ full.dense(), rtol=1e-7, atol=1e-7)
    svd_cut = truncated(full, rank)
    assert (
        ridge_objective(best, differences, inputs, ridge)
        <= ridge_objective(svd_cut, differences, inputs, ridge) * (1 + 1e-9) + 1e-9
    )
    random = LowRankUpdate(torch.randn(out, rank, dtype=torch.float64), torch.randn(inp, rank, dtype=torch.float64))
    assert ridge_objective(best, differences, inputs, ridge) <= ridge_objective(random, differences, inputs, ridge)


@property_settings
@given(tokens=st.integers(1, 12), out=st.integers(1, 7), ridge=st.floats(0.0, 10.0), seed=st.integers(0, 2**31))
def test_the_bias_fit_is_the_shrunk_mean(tokens, out, ridge, seed):
    differences, _ = _data(seed, tokens, 1, out)
    bias = ridge_bias(differences, ridge)
    # the bias is a weight on a constant input 1: the matrix fit with inputs of ones gives the same
    ones = torch.ones(tokens, 1, dtype=torch.float64)
    torch.testing.assert_close(bias, ridge_update(differences, ones, ridge).dense()[:, 0], rtol=1e-10, atol=1e-12)
    gradient = (bias - differences).sum(0) + ridge * bias
    assert gradient.abs().max() < 1e-9 * (1 + differences.abs().sum())


def test_relative_ridge_is_the_mean_eigenvalue_of_the_gram_matrix():
    inputs = torch.randn(7, 5, dtype=torch.float64)
    eigenvalues = torch.linalg.eigvalsh(inputs.T @ inputs)
    assert relative_ridge(inputs, 3.0) == pytest.approx(3.0 * float(eigenvalues.mean()), rel=1e-12)


def test_bad_input_is_refused_in_one_line():
    differences, inputs = _data(0, 4, 3, 2)
    cases = [
        (lambda: ridge_update(differences[:0], inputs[:0], 1.0), "T ≥ 1 fitted tokens"),
        (lambda: ridge_update(differences, inputs[:3], 1.0), "need the same T"),
        (lambda: ridge_update(differences, inputs, -1.0), "must be ≥ 0"),
        (lambda: ridge_update(differences, inputs * float("nan"), 1.0), "NaN"),
        (lambda: truncated(ridge_update(differences, inputs, 1.0), 0), "rank must be ≥ 1"),
        (lambda: relative_ridge(inputs, float("nan")), "multiple must be ≥ 0"),
    ]
    for call, message in cases:
        with pytest.raises(ImplicitICLError, match=message) as error:
            call()
        assert "\n" not in str(error.value)
