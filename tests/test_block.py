"""The contextual-block API: the block with its context equals the patched block without it."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from implicit_icl import ContextualBlock, ImplicitICLError
from implicit_icl.toy.attention import CausalSelfAttention

FORMS = {  # name: (skip, mlp_reads, pre-LayerNorm)
    "paper (no skip)": (False, "residual", False),
    "skip, MLP reads attention": (True, "attention", False),
    "pre-LayerNorm residual": (True, "residual", True),
}
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def make_block(form, width, hidden, n_heads, dtype, seed):
    skip, mlp_reads, pre_norm = FORMS[form]
    torch.manual_seed(seed)
    attention = CausalSelfAttention(width, width, n_heads=n_heads)
    mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
    norm = nn.LayerNorm(width) if pre_norm else None
    return ContextualBlock(attention, mlp, skip=skip, mlp_reads=mlp_reads, norm=norm).to(dtype)


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


block_cases = dict(
    form=st.sampled_from(sorted(FORMS)),
    width=st.integers(2, 9),  # LayerNorm of a 1-dim vector is 0: no reference to divide by
    hidden=st.integers(1, 17),
    n_heads=st.integers(1, 3),
    n_context=st.integers(1, 12),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 10_000),
)


@settings(max_examples=60, deadline=None)
@given(**block_cases, data=st.data())
def test_patched_block_without_context_equals_block_with_it(form, width, hidden, n_heads, n_context, dtype, seed, data):
    block = make_block(form, width, hidden, n_heads, dtype, seed)
    sequence = torch.randn(n_context + 1, width, dtype=dtype)
    context, query = sequence[:-1], sequence[-1]
    with torch.no_grad():
        with_context = block(sequence)[-1]
        # the whole context
        update = block.update_for_query(context, query)
        assert relative_error(block(query[None], update)[-1], with_context) <= TOLERANCE[dtype]
        singular = torch.linalg.svdvals(update.weight.dense().double())
        assert singular.shape[0] == 1 or singular[1] <= 1e-6 * singular[0] + 1e-30
        # a portion Y, the rest of the context staying in place
        removed = data.draw(st.sets(st.integers(0, n_context - 1), min_size=1), label="portion")
        kept = [i for i in range(n_context) if i not in removed]
        portion_update = block.update_for_portion(context, query, sorted(removed))
        reduced = torch.cat([context[kept], query[None]])
        assert relative_error(block(reduced, portion_update)[-1], with_context) <= TOLERANCE[dtype]


@settings(max_examples=30, deadline=None)
@given(**block_cases)
def test_every_position_has_its_own_exact_update(form, width, hidden, n_heads, n_context, dtype, seed):
    block = make_block(form, width, hidden, n_heads, dtype, seed)
    sequence = torch.randn(n_context + 1, width, dtype=dtype)
    with torch.no_grad():
        with_context = block(sequence)
        updates = block.updates_every_position(sequence)
        patched = block.forward_every_position(sequence, updates)
    assert updates.weight.batch_shape == (n_context + 1,) and updates.weight.rank == 1
    for position in range(n_context + 1):
        assert relative_error(patched[position], with_context[position]) <= TOLERANCE[dtype]


def test_patched_path_really_changes_the_output():
    """Guard: without the update the query alone is far from the context-ful output."""
    block = make_block("pre-LayerNorm residual", 8, 16, 2, torch.float64, 0)
    sequence = torch.randn(10, 8, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(block(sequence[-1:])[-1], block(sequence)[-1]) > 1e-2


def test_bad_inputs_say_what_is_wrong():
    block = make_block("paper (no skip)", 4, 8, 1, torch.float64, 0)
    sequence = torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(ImplicitICLError, match="context must be a non-empty"):
        block.update_for_query(sequence[:0], sequence[0])
    with pytest.raises(ImplicitICLError, match="query has shape"):
        block.update_for_query(sequence[:-1], torch.ones(3, dtype=torch.float64))
    with pytest.raises(ImplicitICLError, match="selects no context token"):
        block.update_for_portion(sequence[:-1], sequence[-1], [])
    with pytest.raises(ImplicitICLError, match="out of range"):
        block.update_for_portion(sequence[:-1], sequence[-1], [7])
    with pytest.raises(ImplicitICLError, match="NaN or infinite"):
        block.update_for_query(sequence[:-1] * float("nan"), sequence[-1])
    with pytest.raises(ImplicitICLError, match="no nn.Linear"):
        ContextualBlock(block.contextual, nn.GELU())


def test_zero_reference_activation_is_named():
    """A(x) = 0 (here: a value projection that kills the query) leaves no rank-1 update to take."""
    block = make_block("paper (no skip)", 3, 5, 1, torch.float64, 0)
    with torch.no_grad():
        block.contextual.value.weight[:, 0] = 0
    query = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    with pytest.raises(ImplicitICLError, match="zero vector"):
        block.update_for_query(torch.randn(2, 3, dtype=torch.float64), query)
