"""The implicit rank-1 update of docs/theory.md §2–3 on plain tensors.

A contextual block feeds W (the first dense matrix of its MLP) with A(C, x) when the context C is present
and with A(x) (or A(C\\Y, x)) when it is removed. The update

    ΔW = (W ΔA) a^T / ||a||^2,   ΔA = a_C − a,

makes (W + ΔW) a = W a_C, so the rest of the MLP sees exactly what it saw with the context. ΔW is kept
factored as u v^T with u = W ΔA and v = a / ||a||^2 (a `LowRankUpdate` of rank 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from implicit_icl.errors import ImplicitICLError, check_finite, check_last_dim, safe_squared_norm
from implicit_icl.theory.low_rank import LowRankUpdate


def rank_one_update(weight: Tensor, input_context: Tensor, input_reduced: Tensor) -> LowRankUpdate:
    """The exact update of Thm 2.2: (W + ΔW) a = W a_C with ΔW of minimum Frobenius norm.

    weight: [out, in] (nn.Linear orientation); input_context a_C and input_reduced a: [..., in], the
    vectors W reads with and without (part of) the context. Returns ΔW = W (a_C − a) a^T / ||a||^2.
    """
    if weight.dim() != 2:
        raise ImplicitICLError(f"weight must be a matrix [out, in], got shape {tuple(weight.shape)}")
    for name, tensor in (("input with context", input_context), ("input without context", input_reduced)):
        check_last_dim(name, tensor, weight.shape[1])
        check_finite(name, tensor)
    if input_context.shape != input_reduced.shape:
        raise ImplicitICLError(
            f"inputs with and without context differ in shape: {tuple(input_context.shape)} vs "
            f"{tuple(input_reduced.shape)}"
        )
    check_finite("weight", weight)
    squared = safe_squared_norm("the input without context (the reference vector a)", input_reduced)
    u = (input_context - input_reduced) @ weight.T
    v = input_reduced / squared.unsqueeze(-1)
    return LowRankUpdate.rank_one(u, v)


@dataclass(frozen=True)
class ImplicitUpdate:
    """What a block needs to forget its context: a rank-1 update of the first MLP matrix, and for
    blocks with a skip connection an output shift.

    weight: ΔW of the first MLP matrix, rank 1: U [..., out, 1], V [..., in, 1].
    bias_shift: Δb' [..., d_model] added to the block output (a steering vector on the residual
    stream), or None for a block without a skip around its MLP.
    """

    weight: LowRankUpdate
    bias_shift: Tensor | None = None


def skip_update(weight: Tensor, attention_context: Tensor, attention_reduced: Tensor) -> ImplicitUpdate:
    """[D] appendix: the block x + A + W' g(W A + b) + b' needs ΔW of Thm 2.2 and Δb' = ΔA.

    weight: [out, in]; attention_context A(C, x), attention_reduced A(x): [..., in].
    """
    delta_w = rank_one_update(weight, attention_context, attention_reduced)
    return ImplicitUpdate(delta_w, attention_context - attention_reduced)


def residual_update(
    weight: Tensor,
    residual_context: Tensor,
    residual_reduced: Tensor,
    mlp_input_context: Tensor,
    mlp_input_reduced: Tensor,
) -> ImplicitUpdate:
    """[I] eq. 27–28 for any residual block y = r + MLP(z), at one or many positions.

    weight: [out, in]; residual_* r_C, r: [..., d_model] (the stream before the MLP is added);
    mlp_input_* z_C, z: [..., in] (the MLP input, after any norm). Returns ΔW = W (z_C − z) z^T/||z||^2
    so that the MLP outputs MLP(z_C), and Δb' = r_C − r so that the residual difference is absorbed.
    """
    check_finite("residual with context", residual_context)
    check_finite("residual without context", residual_reduced)
    if residual_context.shape != residual_reduced.shape:
        raise ImplicitICLError(
            f"residuals with and without context differ in shape: {tuple(residual_context.shape)} vs "
            f"{tuple(residual_reduced.shape)}"
        )
    delta_w = rank_one_update(weight, mlp_input_context, mlp_input_reduced)
    return ImplicitUpdate(delta_w, residual_context - residual_reduced)
