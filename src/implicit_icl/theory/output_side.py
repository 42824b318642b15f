"""Output-side solvers of docs/theory.md §4: add a shift δ = r_C − r to a block's output by a weight change.

Once the input side makes the MLP produce its context-ful output, what remains is the difference δ of
the residual streams. Which parameter can absorb it depends on the architecture:

- a bias on the MLP output: Δb = δ (a steering vector) — no function needed, the shift is δ itself;
- the MLP output matrix:    ΔW_down = δ a_C^T / ||a_C||^2 (keeps the patch bias-free);
- a post-norm scale s in y = r + s ⊙ n(m), n(m) = m / sqrt(mean(m^2) + eps):
  elementwise Δs = δ ⊘ n(m_C), or the stable variant that moves m first and rescales s uniformly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_icl.errors import ImplicitICLError, check_finite, check_last_dim, safe_squared_norm
from implicit_icl.theory.low_rank import LowRankUpdate


def output_rank_one(shift: Tensor, inner_context: Tensor) -> LowRankUpdate:
    """ΔW_down = δ a_C^T / ||a_C||^2, so that (W_down + ΔW_down) a_C = W_down a_C + δ.

    shift δ: [..., out]; inner_context a_C (the activation W_down reads): [..., in].
    """
    check_finite("output shift", shift)
    check_finite("inner activation with context", inner_context)
    squared = safe_squared_norm("the inner activation a_C read by the output matrix", inner_context)
    return LowRankUpdate.rank_one(shift, inner_context / squared.unsqueeze(-1))


def rms_normalize(x: Tensor, eps: float) -> Tensor:
    """n(x) = x / sqrt(mean(x^2) + eps) over the last dimension: [..., d] -> [..., d]."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def norm_scale_shift(shift: Tensor, mlp_output_context: Tensor, eps: float) -> Tensor:
    """Elementwise Δs with (s + Δs) ⊙ n(m_C) = s ⊙ n(m_C) + δ: Δs = δ ⊘ n(m_C) (see check_elementwise_scale).

    shift δ, mlp_output_context m_C: [..., d]. Exact, but ill-conditioned where n(m_C) is tiny: in low
    precision prefer `stable_norm_scale_patch`.
    """
    check_finite("output shift", shift)
    check_finite("MLP output with context", mlp_output_context)
    return scale_reaching(shift, rms_normalize(mlp_output_context, eps))


def scale_reaching(target: Tensor, normalized: Tensor) -> Tensor:
    """The elementwise scale s with s ⊙ normalized = target: [..., d] -> [..., d].

    Coordinates where both are 0 get 0; where only `normalized` is 0 no scale reaches the target.
    """
    blocked = (normalized == 0) & (target != 0)
    if blocked.any():
        raise ImplicitICLError(
            f"the normalised MLP output is zero at {int(blocked.sum())} coordinate(s) where the needed change is "
            "not, so no norm-scale patch reaches it; use the stable variant (output 'stable')"
        )
    return torch.where(normalized == 0, torch.zeros_like(target), target / normalized)


STABLE_SCALE_FLOOR = 0.1  # measured on Gemma 3 270M in float32: 0.01 and 0.3 lose 5-30x in logit error


def working_norm_scale(scale: Tensor, scale_floor: float) -> Tensor:
    """ŝ: the scale s with every |s_j| raised to at least scale_floor · rms(s), signs kept (0 counts as +): [d]."""
    floor = scale_floor * scale.pow(2).mean().sqrt()
    sign = torch.where(scale < 0, -torch.ones_like(scale), torch.ones_like(scale))
    return sign * torch.clamp(scale.abs(), min=float(floor))


def check_elementwise_scale(scale: Tensor, shift: Tensor) -> None:
    """Refuse the elementwise scale patch where the scale s is zero and the shift δ is not: [d], [..., d].

    There the block never wrote that coordinate and the patch would switch it on for every token with
    scale δ_j / n(m_C)_j. Exact in float64, but on Gemma 3 270M in float32 the error of such a patch grows
    from 1e-4 to 1e5 over the layers (logits off by 50); the stable variant reaches these coordinates.
    """
    blocked = (scale == 0) & (shift != 0)
    if blocked.any():
        raise ImplicitICLError(
            f"the post-norm scale is zero at {int(blocked.sum())} coordinate(s) where the needed shift is not, "
            "where an elementwise scale patch is ill-conditioned; use the stable variant (output 'stable')"
        )


def stable_norm_scale_patch(
    shift: Tensor,
    mlp_output_context: Tensor,
    inner_context: Tensor,
    scale: Tensor,
    eps: float,
    scale_floor: float = STABLE_SCALE_FLOOR,
) -> tuple[LowRankUpdate, Tensor]:
    """The low-precision-friendly post-norm patch ([G]): a rank-1 ΔW_down, then a rescale of s.

    The block outputs r + s ⊙ n(m); it must output r + T, T = s ⊙ n(m_C) + δ = ŝ ⊙ t with t = T ⊘ ŝ,
    where ŝ is a working scale (`working_norm_scale`: s with every |s_j| raised to scale_floor · rms(s)).
    ΔW_down moves m_C to m' = α t (α keeps the size of m_C), whose normalised form is t up to one scalar
    κ; the new scale κ ŝ, i.e. Δs = κ ŝ − s, restores it (uniform, (κ − 1) s, where |s_j| is above the
    floor). No coordinate is divided by a small normalised entry, which is what makes the elementwise
    solution blow up in bfloat16. With ŝ = s a zero scale (real Gemma 3 weights have w = −1 entries)
    makes t infinite, and a small one makes t, hence κ and every new scale, huge: Gemma 3 270M's float32
    logits were then off by 40-50 (the floor brings them to 1e-4; docs/results/gemma3.md).

    shift δ, mlp_output_context m_C: [..., d]; scale s (the effective scale, e.g. 1 + w for Gemma): [d];
    inner_context a_C: [..., d_inner]. Returns (ΔW_down, Δs) with Δs: [..., d] (κ ŝ − s: (κ − 1) s where |s_j| is above the floor).
    """
    for name, tensor in (("output shift", shift), ("MLP output with context", mlp_output_context)):
        check_last_dim(name, tensor, scale.shape[-1])
        check_finite(name, tensor)
    # ŝ ⊙ t is the post-norm output to reach. Where |s_j| is below the floor, t_j = T_j / ŝ_j stays of the
    # size of n(m_C) instead of blowing up, and the new scale κ ŝ_j, not s_j, carries that coordinate.
    working_scale = working_norm_scale(scale, scale_floor)
    target = (scale * rms_normalize(mlp_output_context, eps) + shift) / working_scale
    target_rms = safe_squared_norm("the target of the stable norm patch", target).div(target.shape[-1]).sqrt()
    output_rms = safe_squared_norm("the MLP output m_C", mlp_output_context).div(target.shape[-1]).sqrt()
    alpha = (output_rms / target_rms).unsqueeze(-1)
    moved_output = alpha * target
    down_update = output_rank_one(moved_output - mlp_output_context, inner_context)
    kappa = torch.sqrt(moved_output.pow(2).mean(-1, keepdim=True) + eps) / alpha
    return down_update, kappa * working_scale - scale
