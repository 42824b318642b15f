"""The identities of docs/theory.md §2–4 on random tensors of random shapes (hypothesis)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from implicit_icl import ImplicitICLError
from implicit_icl.errors import check_finite
from implicit_icl.theory import (
    LowRankUpdate,
    norm_scale_shift,
    output_rank_one,
    rank_one_update,
    residual_update,
    rms_normalize,
    shared_norm_targets,
    shared_scale_fit,
    skip_update,
    stable_norm_scale_patch,
    working_norm_scale,
)
from implicit_icl.theory.least_squares import relative_ridge
from implicit_icl.theory.output_side import SHARED_SCALE_RANGE, check_elementwise_scale

dims = st.integers(1, 12)
seeds = st.integers(0, 2**31 - 1)
property_settings = settings(max_examples=40, deadline=None)


def randn(generator, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=generator, dtype=dtype)


@property_settings
@given(out=dims, inp=dims, seed=seeds)
def test_rank_one_update_reproduces_the_context_and_is_minimum_norm(out, inp, seed):
    g = torch.Generator().manual_seed(seed)
    weight, a_context, a = randn(g, out, inp), randn(g, inp), randn(g, inp)
    update = rank_one_update(weight, a_context, a)
    dense = update.dense()
    # (W + ΔW) a = W a_C
    torch.testing.assert_close((weight + dense) @ a, weight @ a_context, rtol=1e-12, atol=1e-12)
    # the minimum-Frobenius-norm solution of X a = W ΔA is (W ΔA) a^+: a second method via pinv
    minimum = torch.outer(weight @ (a_context - a), torch.linalg.pinv(a[:, None])[0])
    torch.testing.assert_close(dense, minimum, rtol=1e-10, atol=1e-12)
    # any other solution ΔW + M (M a = 0) also reproduces the context, and is larger
    other = dense + randn(g, out, inp) @ (torch.eye(inp, dtype=a.dtype) - torch.outer(a, a) / (a @ a))
    torch.testing.assert_close((weight + other) @ a, weight @ a_context, rtol=1e-10, atol=1e-10)
    assert torch.linalg.matrix_norm(other) >= torch.linalg.matrix_norm(dense) * (1 - 1e-12)
    # ||ΔW||_F = ||ΔW||_2 = ||W ΔA|| / ||a||, read from the factors
    expected = (weight @ (a_context - a)).norm() / a.norm()
    torch.testing.assert_close(update.norm(), expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.linalg.matrix_norm(dense, ord=2), expected, rtol=1e-10, atol=1e-14)
    if min(out, inp) > 1:
        singular = torch.linalg.svdvals(dense)
        assert singular[1] <= 1e-12 * max(singular[0].item(), 1e-300)


@property_settings
@given(out=dims, inp=dims, batch=st.integers(1, 5), seed=seeds)
def test_rank_one_factors_apply_like_the_dense_matrix(out, inp, batch, seed):
    g = torch.Generator().manual_seed(seed)
    update = LowRankUpdate.rank_one(randn(g, batch, out), randn(g, batch, inp))
    x = randn(g, batch, inp)
    torch.testing.assert_close(update.apply(x), (update.dense() @ x[..., None])[..., 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(update.norm(), torch.linalg.matrix_norm(update.dense()), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(update[0].dense(), update.dense()[0])


@property_settings
@given(out=dims, width=dims, seed=seeds, dtype=st.sampled_from([torch.float32, torch.float64]))
def test_skip_and_residual_forms_reproduce_a_residual_mlp(out, width, seed, dtype):
    """y = r + W' gelu(W z + b) + b' with z, r from context-ful and reduced inputs, at a batch of positions."""
    g = torch.Generator().manual_seed(seed)
    weight, bias = randn(g, out, width, dtype=dtype), randn(g, out, dtype=dtype)
    weight_out = randn(g, width, out, dtype=dtype)

    def block(r, z, update=None):
        hidden = z @ weight.T + bias + (update.weight.apply(z) if update else 0)
        shift = update.bias_shift if update else 0
        return r + torch.nn.functional.gelu(hidden) @ weight_out.T + shift

    r_context, r, z_context, z = (randn(g, 4, width, dtype=dtype) for _ in range(4))
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    update = residual_update(weight, r_context, r, z_context, z)
    torch.testing.assert_close(block(r, z, update), block(r_context, z_context), **tolerance)
    # [D]'s skip block x + A + MLP(A): the residual is x + A, the MLP reads A
    x = randn(g, 4, width, dtype=dtype)
    update = skip_update(weight, z_context, z)
    torch.testing.assert_close(block(x + z, z, update), block(x + z_context, z_context), **tolerance)


@property_settings
@given(inner=dims, width=st.integers(2, 12), seed=seeds)
def test_output_side_solvers_add_the_shift(inner, width, seed):
    g = torch.Generator().manual_seed(seed)
    down, a_context, shift = randn(g, width, inner), randn(g, inner), randn(g, width)
    # rank-1 on the output matrix
    patched_output = (down + output_rank_one(shift, a_context).dense()) @ a_context
    torch.testing.assert_close(patched_output, down @ a_context + shift, rtol=1e-10, atol=1e-10)
    # post-norm scale: y = r + s ⊙ n(m)
    eps, scale, m_context = 1e-6, 1 + 0.1 * randn(g, width), down @ a_context
    target = scale * rms_normalize(m_context, eps) + shift
    delta_scale = norm_scale_shift(shift, m_context, eps)
    torch.testing.assert_close((scale + delta_scale) * rms_normalize(m_context, eps), target, rtol=1e-9, atol=1e-9)
    # stable variant: move m first, then rescale s uniformly
    down_update, delta_scale = stable_norm_scale_patch(shift, m_context, a_context, scale, eps)
    moved = (down + down_update.dense()) @ a_context
    torch.testing.assert_close((scale + delta_scale) * rms_normalize(moved, eps), target, rtol=1e-9, atol=1e-9)
    # its scale patch is a multiple of s: no coordinate is divided by a small normalised entry
    ratio = delta_scale / scale
    torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), rtol=1e-12, atol=1e-12)


@property_settings
@given(tokens=st.integers(1, 6), extra=st.integers(0, 8), seed=seeds)
def test_one_shared_post_norm_scale_reaches_every_needed_output(tokens, extra, seed):
    """§7 behind a post-norm: with T ≪ d tokens, s' ⊙ n(m*_k) = T_k for every k, s' keeps the working
    scale's signs, m*_k keeps the size of m_k, and the coordinate-wise fit on n(m*) gives s' back. (With
    d close to T the positive 1/s'² may not exist: one token larger than another in every coordinate.)"""
    g = torch.Generator().manual_seed(seed)
    width, eps = 8 * tokens + extra + 8, 1e-6
    scale = 1 + 0.5 * randn(g, width)
    scale[0] = 0.0  # real Gemma 3 weights have zero scales
    working = working_norm_scale(scale, 0.1)
    mlp_outputs = randn(g, tokens, width)
    needed = scale * rms_normalize(mlp_outputs, eps) + 0.3 * randn(g, tokens, width)
    shared, moved = shared_norm_targets(needed, mlp_outputs, working, eps)
    torch.testing.assert_close(shared * rms_normalize(moved, eps), needed, rtol=1e-10, atol=1e-10)
    assert torch.equal(torch.sign(shared), torch.sign(working))
    torch.testing.assert_close(moved.norm(dim=-1), mlp_outputs.norm(dim=-1), rtol=1e-10, atol=0)
    normalized = rms_normalize(moved, eps)
    torch.testing.assert_close(shared_scale_fit(needed, normalized, scale, 0.0), shared, rtol=1e-9, atol=1e-9)
    # one token at ridge 0: the elementwise solution; a large ridge: the prior
    torch.testing.assert_close(shared_scale_fit(needed[:1], normalized[:1], scale, 0.0), needed[0] / normalized[0])
    torch.testing.assert_close(shared_scale_fit(needed, normalized, scale, 1e12), scale, rtol=1e-6, atol=1e-6)


def test_unreachable_shared_scale_targets_stay_bounded_and_keep_their_direction():
    """Token 2's needed output is token 1's times 5: no one scale gives both rms c. s' stays within
    SHARED_SCALE_RANGE of ŝ and each token's n(m*_k) still points along T_k ⊘ s'."""
    g = torch.Generator().manual_seed(3)
    first = randn(g, 16)
    needed, mlp_outputs, working = torch.stack([first, 5 * first]), randn(g, 2, 16), 1 + 0.1 * randn(g, 16)
    shared, moved = shared_norm_targets(needed, mlp_outputs, working, 1e-6)
    bound = math.exp(SHARED_SCALE_RANGE / 2)
    assert ((shared / working) <= bound * (1 + 1e-9)).all() and ((shared / working) >= (1 - 1e-9) / bound).all()
    reached = shared * rms_normalize(moved, 1e-6)
    cosine = torch.nn.functional.cosine_similarity(reached, needed, dim=-1)
    torch.testing.assert_close(cosine, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)


def test_regularised_shared_scale_is_a_stationary_point_nearer_the_working_scale():
    """On the same unreachable targets, scale_ridge = 1 returns a stationary point of
    ||c² − R exp(u)||² + λ ||u||² (gradient −2 (R diag e^u)ᵀ gap + 2 λ u = 0), with a smaller log-shift u
    than the unregularised fit, and a huge ridge leaves s' at ŝ."""
    g = torch.Generator().manual_seed(3)
    first = randn(g, 16)
    needed, mlp_outputs, working = torch.stack([first, 5 * first]), randn(g, 2, 16), 1 + 0.1 * randn(g, 16)
    shift = {r: -2 * torch.log(shared_norm_targets(needed, mlp_outputs, working, 1e-6, r)[0] / working) for r in (0, 1)}
    size = mlp_outputs.pow(2).mean(-1) + 1e-6
    relative = (needed / working).pow(2) / 16

    def gradient(log_shift):
        gap = (size - 1e-6) / size - relative @ log_shift.exp()
        return -2 * (relative * log_shift.exp()).T @ gap + 2 * relative_ridge(relative, 1.0) * log_shift

    # Relative to the gradient at u = 0: Gauss-Newton stops where float64 no longer sees the objective fall.
    assert gradient(shift[1]).abs().max() < 1e-8 * gradient(torch.zeros_like(working)).abs().max()
    assert shift[1].norm() < shift[0].norm()
    stiff, _ = shared_norm_targets(needed, mlp_outputs, working, 1e-6, 1e9)
    torch.testing.assert_close(stiff, working, rtol=1e-6, atol=0)


def test_zero_reference_vector_is_refused():
    with pytest.raises(ImplicitICLError, match="zero vector"):
        rank_one_update(torch.ones(3, 2), torch.ones(2), torch.zeros(2))
    with pytest.raises(ImplicitICLError, match="zero vector"):
        output_rank_one(torch.ones(3), torch.zeros(4))


def test_mismatched_shapes_are_refused():
    with pytest.raises(ImplicitICLError, match="last dimension 3 but 2"):
        rank_one_update(torch.ones(4, 2), torch.ones(3), torch.ones(3))
    with pytest.raises(ImplicitICLError, match="differ in shape"):
        rank_one_update(torch.ones(4, 2), torch.ones(5, 2), torch.ones(2))
    with pytest.raises(ImplicitICLError, match="matrix"):
        rank_one_update(torch.ones(4), torch.ones(4), torch.ones(4))
    with pytest.raises(ImplicitICLError, match="batch shape"):
        LowRankUpdate.rank_one(torch.ones(2, 3), torch.ones(3, 3))
    with pytest.raises(ImplicitICLError, match="batch shape or rank"):
        LowRankUpdate(torch.ones(4, 2), torch.ones(3, 3))
    with pytest.raises(ImplicitICLError, match="do not start with the update's batch shape"):
        LowRankUpdate(torch.ones(2, 4, 1), torch.ones(2, 3, 1)).apply(torch.ones(5, 3))


def test_non_finite_values_are_refused():
    with pytest.raises(ImplicitICLError, match="NaN or infinite"):
        rank_one_update(torch.ones(3, 2), torch.tensor([1.0, float("nan")]), torch.ones(2))
    with pytest.raises(ImplicitICLError, match="NaN or infinite"):
        rank_one_update(torch.full((3, 2), float("inf")), torch.ones(2), torch.ones(2))


def test_norm_scale_patch_refuses_unreachable_coordinates():
    with pytest.raises(ImplicitICLError, match="zero at 1 coordinate"):
        norm_scale_shift(torch.ones(3), torch.tensor([1.0, 0.0, 2.0]), 1e-6)
    with pytest.raises(ImplicitICLError, match="scale is zero at 1 coordinate"):  # the stable variant reaches it
        check_elementwise_scale(torch.tensor([1.0, 0.0, 1.0]), torch.ones(3))


def test_finiteness_check_decided_by_one_sum_is_exact():
    """Opposite infinities (a NaN sum), a lone NaN and an overflowing but finite sum each get the right answer."""
    big = torch.full((4,), torch.finfo(torch.float32).max)
    check_finite("huge", big)  # the sum overflows to inf, every entry is finite
    for bad in ([1.0, torch.inf, -torch.inf], [torch.nan, 1.0], [torch.inf]):
        with pytest.raises(ImplicitICLError, match="NaN or infinite"):
            check_finite("bad", torch.tensor(bad))
