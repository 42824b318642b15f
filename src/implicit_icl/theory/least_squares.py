"""Least-squares (ridge) fits of query-independent patches, docs/theory.md §7, on plain tensors.

One weight change ΔW that maps many reduced inputs z_t to the changes d_t = W (z_C,t − z_t) their
context-ful versions would cause:

    minimise_ΔW  Σ_t ||ΔW z_t − d_t||² + λ ||ΔW||_F²      ΔW* = D Z^T (Z Z^T + λ I)^{-1} = D (Z^T Z + λ I)^{-1} Z^T

with the columns z_t, d_t stacked as Z [in, T], D [out, T]. Here the T tokens come as rows, the way
activations do: `inputs` [T, in] = Z^T and `differences` [T, out] = D^T. The solution stays factored:

- T ≤ in (fewer tokens than dimensions): U = D (Z^T Z + λ I_T)^{-1} [out, T], V = Z [in, T] — a T × T solve
  (or U = D, V = Z (Z^T Z + λ I_T)^{-1}, whichever side is smaller);
- T > in: U = D Z^T (Z Z^T + λ I_in)^{-1} [out, in], V = I_in — an in × in solve.

At λ = 0 a singular Gram matrix (repeated tokens) gives the minimum-norm solution D Z^+ (pseudo-inverse).
With one token, ΔW* = d z^T / (||z||² + λ): at λ = 0 the exact rank-1 patch of §2.

Rank r: `truncated` keeps the top r singular triplets of ΔW* (the best rank-r *matrix* approximation),
from QR factorisations of U and V and an SVD of a k × k matrix; `best_rank_fit` keeps P_r ΔW* with P_r the
projector on the top-r left singular vectors of ΔW* S^{1/2}, S = Z Z^T + λ I (the best rank-r *fit* of
the objective above, which differs unless S ∝ I). A bias is a weight on a constant input 1:
Δb = Σ_t d_t / (T + λ).
"""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_icl.errors import ImplicitICLError, check_finite
from implicit_icl.theory.low_rank import LowRankUpdate


def _check_tokens(differences: Tensor, inputs: Tensor | None, ridge: float) -> None:
    if differences.dim() != 2 or differences.shape[0] == 0:
        raise ImplicitICLError(
            f"differences must be [T, out] with T ≥ 1 fitted tokens, got shape {tuple(differences.shape)}"
        )
    if inputs is not None and (inputs.dim() != 2 or inputs.shape[0] != differences.shape[0]):
        raise ImplicitICLError(
            f"inputs [T, in] and differences [T, out] need the same T, got {tuple(inputs.shape)} and "
            f"{tuple(differences.shape)}"
        )
    if not ridge >= 0:  # also refuses NaN
        raise ImplicitICLError(f"the ridge λ must be ≥ 0, got {ridge}")
    check_finite("differences", differences)
    if inputs is not None:
        check_finite("inputs", inputs)


def relative_ridge(inputs: Tensor, multiple: float) -> float:
    """λ = multiple · trace(Z Z^T) / in = multiple · Σ_t ||z_t||² / in, the scale the fit is regularised on.

    inputs: [T, in]. trace(Z Z^T) / in is the mean eigenvalue of Z Z^T, so `multiple` is unit-free."""
    if not multiple >= 0:
        raise ImplicitICLError(f"the ridge multiple must be ≥ 0, got {multiple}")
    return float(multiple * inputs.double().pow(2).sum() / inputs.shape[-1])


def _solve_psd(gram: Tensor, ridge: float, right: Tensor) -> Tensor:
    """(gram + ridge I)^{-1} right, or the pseudo-inverse at ridge 0 (gram may be singular): [n, m]."""
    if ridge > 0:
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        return torch.linalg.solve(gram + ridge * eye, right)
    return torch.linalg.pinv(gram, hermitian=True) @ right


def ridge_solved(inputs: Tensor, ridge: float) -> Tensor:
    """(Z^T Z + λ I_T)^{-1} Z^T as rows: [T, in], float64 — the right factor's solve, shareable by every matrix
    fitted on the same inputs (e.g. a gated MLP's gate and up)."""
    Z = inputs.double()
    return _solve_psd(Z @ Z.T, ridge, Z)


def ridge_update(differences: Tensor, inputs: Tensor, ridge: float, solved: Tensor | None = None) -> LowRankUpdate:
    """ΔW* minimising Σ_t ||ΔW z_t − d_t||² + λ ||ΔW||_F², factored (see the module docstring).

    differences: [T, out] (rows d_t); inputs: [T, in] (rows z_t); ridge: λ ≥ 0 (absolute; see
    `relative_ridge`); solved: `ridge_solved(inputs, ridge)` if already computed. Computed in float64;
    returns U [out, k], V [in, k] in the inputs' dtype, k = min(T, in). With T ≤ in the T × T solve is applied
    to the smaller side: U = D (Z^T Z + λ I)^{-1}, V = Z when out ≤ in, else U = D, V = Z (Z^T Z + λ I)^{-1}."""
    _check_tokens(differences, inputs, ridge)
    dtype = inputs.dtype
    D, Z = differences.double().T, inputs.double().T  # [out, T], [in, T]
    (n_in, n_tokens), n_out = Z.shape, D.shape[0]
    if n_tokens <= n_in and n_out > n_in:
        right = ridge_solved(inputs, ridge) if solved is None else solved.double()
        return LowRankUpdate(D.to(dtype), right.T.to(dtype))
    if n_tokens <= n_in:
        U = _solve_psd(Z.T @ Z, ridge, D.T).T  # D (Z^T Z + λ I)^{-1}, the Gram matrix is symmetric
        return LowRankUpdate(U.to(dtype), Z.to(dtype))
    U = _solve_psd(Z @ Z.T, ridge, Z @ D.T).T  # D Z^T (Z Z^T + λ I)^{-1}
    return LowRankUpdate(U.to(dtype), torch.eye(n_in, dtype=dtype, device=inputs.device))


def ridge_bias(differences: Tensor, ridge: float) -> Tensor:
    """Δb = Σ_t d_t / (T + λ): the ridge fit of a bias (a weight on the constant input 1). [T, out] -> [out]."""
    _check_tokens(differences, None, ridge)
    return (differences.double().sum(0) / (differences.shape[0] + ridge)).to(differences.dtype)


def ridge_objective(update: LowRankUpdate, differences: Tensor, inputs: Tensor, ridge: float) -> Tensor:
    """Σ_t ||ΔW z_t − d_t||² + λ ||ΔW||_F², from the factors (float64 scalar)."""
    update = update.to(torch.float64)
    residual = update.apply(inputs.double()) - differences.double()
    return residual.pow(2).sum() + ridge * update.norm().pow(2)


def _orthonormal(update: LowRankUpdate) -> tuple[Tensor, Tensor, Tensor]:
    """ΔW = Q_u (R_u R_v^T) Q_v^T with Q_u [out, k], Q_v [in, k] orthonormal columns; returns Q_u, core, Q_v."""
    Q_u, R_u = torch.linalg.qr(update.U)
    Q_v, R_v = torch.linalg.qr(update.V)
    return Q_u, R_u @ R_v.T, Q_v


def truncated(update: LowRankUpdate, rank: int) -> LowRankUpdate:
    """The best rank-r approximation of ΔW = U V^T in Frobenius norm (its top r singular triplets).

    From the factors: QR of U and V, SVD of the k × k core; cost O((out + in) k²). Returns U' = Q_u A_r S_r
    [out, r'] and V' = Q_v B_r [in, r'], r' = min(r, k, out, in); the singular values sit in U'."""
    if rank < 1:
        raise ImplicitICLError(f"the rank must be ≥ 1, got {rank}")
    if update.batch_shape:
        raise ImplicitICLError("truncate one update at a time; this one is batched")
    Q_u, core, Q_v = _orthonormal(update)
    left, values, right_t = torch.linalg.svd(core)
    keep = min(rank, values.numel())
    return LowRankUpdate(Q_u @ (left[:, :keep] * values[:keep]), Q_v @ right_t[:keep].T)


def best_rank_fit(update: LowRankUpdate, inputs: Tensor, ridge: float, rank: int) -> LowRankUpdate:
    """The rank-r ΔW minimising the ridge objective, given its full-rank minimiser `update` = ΔW*.

    The objective is ||(ΔW − ΔW*) S^{1/2}||_F² + const with S = Z Z^T + λ I, so the answer is P_r ΔW*,
    P_r the projector on the top-r eigenvectors of ΔW* S ΔW*^T (computed in a k-dimensional basis of the
    columns of U). inputs: [T, in], the z_t the fit used; ridge: its λ. Returns factors [out, r'], [in, r']."""
    if rank < 1:
        raise ImplicitICLError(f"the rank must be ≥ 1, got {rank}")
    U, V, Z = update.U.double(), update.V.double(), inputs.double()
    Q, R = torch.linalg.qr(U)  # U = Q R, Q [out, k]
    projected = Z @ V  # [T, k]: the rows z_t^T V
    metric = projected.T @ projected + ridge * (V.T @ V)  # V^T S V  [k, k]
    inner = R @ metric @ R.T  # Q^T ΔW* S ΔW*^T Q
    values, vectors = torch.linalg.eigh((inner + inner.T) / 2)
    keep = min(rank, values.numel())
    E = vectors[:, -keep:].flip(-1)  # top eigenvectors first
    basis = Q @ E  # [out, r]: P_r = basis basis^T
    return LowRankUpdate(basis.to(update.U.dtype), (V @ (U.T @ basis)).to(update.V.dtype))
