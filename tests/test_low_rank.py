"""LowRankUpdate on random factors of random shapes and ranks: every operation against the dense matrix."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from implicit_icl.theory import LowRankUpdate

dims = st.integers(1, 9)
property_settings = settings(max_examples=40, deadline=None)


def _update(generator, batch, out, inp, rank):
    U = torch.randn(*batch, out, rank, generator=generator, dtype=torch.float64)
    V = torch.randn(*batch, inp, rank, generator=generator, dtype=torch.float64)
    return LowRankUpdate(U, V)


@property_settings
@given(
    out=dims,
    inp=dims,
    rank=st.integers(1, 5),
    batch=st.lists(st.integers(1, 3), max_size=2),
    seed=st.integers(0, 2**31),
)
def test_factored_operations_match_the_dense_matrix(out, inp, rank, batch, seed):
    g = torch.Generator().manual_seed(seed)
    update, other = _update(g, batch, out, inp, rank), _update(g, batch, out, inp, rank + 1)
    dense, other_dense = update.dense(), other.dense()
    assert dense.shape == (*batch, out, inp) and update.shape == (out, inp) and update.rank == rank
    x = torch.randn(*batch, 4, inp, generator=g, dtype=torch.float64)  # 4 inputs per batch entry
    torch.testing.assert_close(update.apply(x), x @ dense.transpose(-1, -2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(update.norm(), torch.linalg.matrix_norm(dense), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(update.inner(other), (dense * other_dense).sum((-1, -2)), rtol=1e-10, atol=1e-10)
    summed = update + other
    assert summed.rank == 2 * rank + 1
    torch.testing.assert_close(summed.dense(), dense + other_dense, rtol=1e-12, atol=1e-12)
    if batch:
        torch.testing.assert_close(update[0].dense(), dense[0])


@property_settings
@given(out=dims, inp=dims, rank=st.integers(1, 4), experts=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_added_in_place_in_every_orientation(out, inp, rank, experts, seed):
    g = torch.Generator().manual_seed(seed)
    update = _update(g, (), out, inp, rank)
    weight = torch.randn(out, inp, generator=g, dtype=torch.float64)
    linear, conv1d = weight.clone(), weight.T.clone()  # nn.Linear [out, in]; GPT-2's Conv1D [in, out]
    update.add_to_(linear)
    update.add_to_(conv1d, transposed=True)
    torch.testing.assert_close(linear, weight + update.dense(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv1d, (weight + update.dense()).T, rtol=1e-12, atol=1e-12)
    stacked_update = _update(g, (experts,), out, inp, rank)  # fused experts [E, out, in]
    stacked = torch.randn(experts, out, inp, generator=g, dtype=torch.float64)
    expected = stacked + stacked_update.dense()
    stacked_update.add_to_(stacked)
    torch.testing.assert_close(stacked, expected, rtol=1e-12, atol=1e-12)


def test_rank_one_is_the_k_equal_one_case_and_tensors_round_trip():
    u, v = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    update = LowRankUpdate.rank_one(u, v)
    torch.testing.assert_close(update.dense(), u[:, :, None] * v[:, None, :])
    torch.testing.assert_close(update.norm(), u.norm(dim=-1) * v.norm(dim=-1))
    again = LowRankUpdate.from_tensors(update.tensors("w"), "w")
    assert torch.equal(again.U, update.U) and torch.equal(again.V, update.V)
