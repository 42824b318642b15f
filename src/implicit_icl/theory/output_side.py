"""Output-side solvers of docs/theory.md §4: add a shift δ = r_C − r to a block's output by a weight change.

Once the input side makes the MLP produce its context-ful output, what remains is the difference δ of
the residual streams. Which parameter can absorb it depends on the architecture:

- a bias on the MLP output: Δb = δ (a steering vector) — no function needed, the shift is δ itself;
- the MLP output matrix:    ΔW_down = δ a_C^T / ||a_C||^2 (keeps the patch bias-free);
- a post-norm scale s in y = r + s ⊙ n(m), n(m) = m / sqrt(mean(m^2) + eps):
  elementwise Δs = δ ⊘ n(m_C), or the stable variant that moves m first and rescales s uniformly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from implicit_icl.errors import ImplicitICLError, check_finite, check_last_dim, holds_values, safe_squared_norm
from implicit_icl.theory.least_squares import relative_ridge, ridge_update
from implicit_icl.theory.low_rank import LowRankUpdate


def output_rank_one(shift: Tensor, inner_context: Tensor) -> LowRankUpdate:
    """ΔW_down = δ a_C^T / ||a_C||^2, so that (W_down + ΔW_down) a_C = W_down a_C + δ.

    shift δ: [..., out]; inner_context a_C (the activation W_down reads): [..., in], the right factor as it is
    (the scale goes to the narrower left factor u = δ / ||a_C||^2; a_C is not copied).
    """
    check_finite("output shift", shift)
    check_finite("inner activation with context", inner_context)
    squared = safe_squared_norm("the inner activation a_C read by the output matrix", inner_context)
    return LowRankUpdate.rank_one(shift / squared.unsqueeze(-1), inner_context)


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
    if holds_values(blocked) and blocked.any():
        raise ImplicitICLError(
            f"the normalised MLP output is zero at {int(blocked.sum())} coordinate(s) where the needed change is "
            "not, so no norm-scale patch reaches it; use the stable variant (output 'stable')"
        )
    return torch.where(normalized == 0, torch.zeros_like(target), target / normalized)


SHARED_SCALE_RANGE = 2 * math.log(100.0)  # |u| bound of shared_norm_targets: s' within [ŝ / 100, 100 ŝ]
STABLE_SCALE_FLOOR = 0.1  # measured on Gemma 3 270M in float32: 0.01 and 0.3 lose 5-30x in logit error


def working_norm_scale(scale: Tensor, scale_floor: float) -> Tensor:
    """ŝ: the scale s with every |s_j| raised to at least scale_floor · rms(s), signs kept (0 counts as +): [d]."""
    floor = scale_floor * scale.pow(2).mean().sqrt()
    sign = torch.where(scale < 0, -torch.ones_like(scale), torch.ones_like(scale))
    return sign * torch.maximum(scale.abs(), floor)


def check_elementwise_scale(scale: Tensor, shift: Tensor) -> None:
    """Refuse the elementwise scale patch where the scale s is zero and the shift δ is not: [d], [..., d].

    There the block never wrote that coordinate and the patch would switch it on for every token with
    scale δ_j / n(m_C)_j. Exact in float64, but on Gemma 3 270M in float32 the error of such a patch grows
    from 1e-4 to 1e5 over the layers (logits off by 50); the stable variant reaches these coordinates.
    """
    blocked = (scale == 0) & (shift != 0)
    if holds_values(blocked) and blocked.any():
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


def shared_norm_targets(
    needed: Tensor,
    mlp_outputs: Tensor,
    working_scale: Tensor,
    eps: float,
    scale_ridge: float = 0.0,
    steps: int = 100,
) -> tuple[Tensor, Tensor]:
    """One post-norm scale s' for T tokens and the MLP outputs m* that s' ⊙ n(m*_k) = T_k asks for (§7).

    n(m) = m / sqrt(rms(m)² + eps) has rms c = rms(m) / sqrt(rms(m)² + eps) < 1 whatever the direction of m,
    so T_k is reachable only if rms(T_k ⊘ s') = c_k. With s' = ŝ ⊙ exp(−u / 2) these T conditions read
    f_k(u) = (1/d) Σ_j t_kj² exp(u_j) = c_k², t_k = T_k ⊘ ŝ: Gauss-Newton from u = 0 with minimum-norm,
    halved-until-better steps solves them, so s' moves from ŝ multiplicatively and keeps its signs. Then
    m*_k = sqrt(rms(m_k)² + eps) T_k ⊘ s' keeps the size of m_k and n(m*_k) = T_k ⊘ s' exactly where the
    conditions are solved. They need not have a solution (many tokens, or one whose T_k is larger than
    another's in every coordinate): u stays within ±SHARED_SCALE_RANGE, and a token left off reaches the
    direction of T_k, rescaled. scale_ridge > 0 adds λ ||u||² (λ = scale_ridge · trace(R Rᵀ) / d, R the rows
    t_k² / d), which keeps s' near ŝ where the conditions pull apart instead of spending the whole range on
    them: a scale that fits 20 calibration queries to the edge of its range generalises worst (Gemma 3 270M).

    needed T, mlp_outputs m: [T, d]; working_scale ŝ: [d] (`working_norm_scale`). Returns (s' [d], m* [T, d]).
    """
    check_last_dim("needed post-norm outputs", needed, working_scale.shape[-1])
    check_finite("needed post-norm outputs", needed)
    squared_size = mlp_outputs.pow(2).mean(-1) + eps  # rms(m_k)² + eps: [T]
    reachable = (squared_size - eps) / squared_size  # c_k²
    relative = (needed / working_scale).pow(2) / needed.shape[-1]  # rows t_k² / d: [T, d]

    def gaps(log_weight: Tensor) -> Tensor:  # c² − f(u): [T]
        return reachable - relative @ log_weight.exp()

    # Gauss-Newton on ||c² − f(u)||² + λ ||u||², λ = scale_ridge · trace(R Rᵀ) / d: each step goes to the
    # minimiser of the problem linearised at u; at λ = 0 it is the minimum-norm step J^+ (c² − f).
    ridge = relative_ridge(relative, scale_ridge)

    def objective(log_weight: Tensor) -> Tensor:
        gap = gaps(log_weight)
        return gap @ gap + ridge * log_weight @ log_weight

    log_weight = torch.zeros_like(working_scale)  # u, with 1 / s'² = exp(u) / ŝ²
    for _ in range(steps):
        gap = gaps(log_weight)
        if ridge == 0 and gap.abs().max() < 1e-13:
            break
        jacobian = relative * log_weight.exp()  # ∂f / ∂u: [T, d]
        if ridge == 0:
            step = ridge_update(gap[:, None], jacobian, 0.0).dense()[0]
        else:
            linearised = (gap + jacobian @ log_weight)[:, None]
            step = ridge_update(linearised, jacobian, ridge).dense()[0] - log_weight
        current = objective(log_weight)
        for _halving in range(30):
            if objective(log_weight + step) < current:
                break
            step = step / 2
        log_weight = (log_weight + step).clamp(-SHARED_SCALE_RANGE, SHARED_SCALE_RANGE)
        if step.abs().max() < 1e-12:
            break
    scale = working_scale * torch.exp(-log_weight / 2)
    return scale, squared_size.sqrt()[:, None] * needed / scale


def shared_scale_fit(needed: Tensor, normalized: Tensor, prior: Tensor, ridge: float) -> Tensor:
    """The post-norm scale s'' shared by T tokens that best maps their normalised MLP outputs to the needed
    outputs, coordinate by coordinate: s''_j = (Σ_k n_kj T_kj + μ s'_j) / (Σ_k n_kj² + μ), μ = ridge · mean_j Σ_k n_kj².

    needed T, normalized n: [T, d]; prior s' (what the ridge shrinks towards): [d]. Returns s'' [d]. With
    one token and ridge 0 it is the elementwise solution T ⊘ n; where n = T ⊘ s' for every token it is s'.
    A coordinate that no token's n reaches keeps s'.
    """
    check_finite("normalised MLP outputs", normalized)
    weight = normalized.pow(2).sum(0)  # [d]
    shrink = ridge * weight.mean()
    fitted = ((normalized * needed).sum(0) + shrink * prior) / (weight + shrink)
    return torch.where(weight + shrink == 0, prior, fitted)  # no fitted token reads such a coordinate
