"""docs/theory.md §6 on a real contextual layer: prefix updates, the gradient-descent identity, the factorised form."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from implicit_icl import ImplicitICLError
from implicit_icl.theory import (
    apply_factorised,
    factorised_updates,
    gradient_descent_errors,
    increment_norms,
    prefix_updates,
)
from implicit_icl.toy.attention import CausalSelfAttention

property_settings = settings(max_examples=25, deadline=None)


def attention_outputs(seed, width, inner, n_context, n_heads):
    """A random attention layer, a context and a query; returns W, A(x), the prefix and suffix outputs."""
    torch.manual_seed(seed)
    attention = CausalSelfAttention(width, inner, n_heads=n_heads).double()
    weight = torch.randn(2 * inner + 1, inner, dtype=torch.float64)
    context = torch.randn(n_context, width, dtype=torch.float64)
    query = torch.randn(width, dtype=torch.float64)
    with torch.no_grad():
        alone = attention(query[None])[-1]
        prefixes = torch.stack([attention(torch.cat([context[:i], query[None]]))[-1] for i in range(1, n_context + 1)])
        suffixes = torch.stack([attention(torch.cat([context[i:], query[None]]))[-1] for i in range(n_context)])
    return weight, alone, prefixes, suffixes


@property_settings
@given(
    seed=st.integers(0, 10_000),
    width=st.integers(1, 7),
    inner=st.integers(1, 7),
    n_context=st.integers(1, 9),
    n_heads=st.integers(1, 3),
)
def test_prefix_updates_follow_online_gradient_descent(seed, width, inner, n_context, n_heads):
    weight, alone, prefixes, _ = attention_outputs(seed, width, inner * n_heads, n_context, n_heads)
    updates = prefix_updates(weight, prefixes, alone)
    # each W_i = W + ΔW_i reproduces the i-token prefix on the query alone
    patched = weight @ alone + updates.apply(alone.expand(n_context, -1))
    torch.testing.assert_close(patched, prefixes @ weight.T, rtol=1e-10, atol=1e-10)
    # and the trajectory is online gradient descent on the linear losses L_i, step by step
    assert gradient_descent_errors(weight, prefixes, alone).max() <= 1e-10 * (1 + weight.abs().max())
    # increments read from the factors equal the dense differences
    trajectory = torch.cat([torch.zeros_like(updates.dense()[:1]), updates.dense()])
    dense_steps = torch.linalg.matrix_norm(trajectory.diff(dim=0))
    torch.testing.assert_close(increment_norms(updates), dense_steps, rtol=1e-9, atol=1e-12)


@property_settings
@given(seed=st.integers(0, 10_000), width=st.integers(1, 7), inner=st.integers(1, 7), n_context=st.integers(1, 9))
def test_factorised_dynamics_reproduce_the_context(seed, width, inner, n_context):
    weight, alone, prefixes, suffixes = attention_outputs(seed, width, inner, n_context, 1)
    factors = factorised_updates(suffixes, alone)
    assert factors.U.shape == factors.V.shape == (n_context, inner, 1)
    torch.testing.assert_close(apply_factorised(weight, factors, alone), weight @ prefixes[-1], rtol=1e-10, atol=1e-10)


def test_factorised_product_is_not_the_additive_matrix():
    """Same output on A(x), different matrices: the theory says so, and a check that could not fail would not."""
    weight, alone, prefixes, suffixes = attention_outputs(3, 4, 4, 5, 1)
    factors = factorised_updates(suffixes, alone)
    product = apply_factorised(weight, factors, torch.eye(4, dtype=torch.float64)).T  # W Π (I + u v^T)
    additive = weight + prefix_updates(weight, prefixes, alone).dense()[-1]
    torch.testing.assert_close(product @ alone, additive @ alone, rtol=1e-10, atol=1e-10)
    assert (product - additive).abs().max() > 1e-3


def test_dynamics_refuse_empty_and_mismatched_sequences():
    weight = torch.ones(3, 2)
    with pytest.raises(ImplicitICLError, match="non-empty"):
        prefix_updates(weight, torch.ones(0, 2), torch.ones(2))
    with pytest.raises(ImplicitICLError, match="last dimension"):
        factorised_updates(torch.ones(4, 3), torch.ones(2))
    with pytest.raises(ImplicitICLError, match="zero vector"):
        factorised_updates(torch.ones(2, 2), torch.zeros(2))
