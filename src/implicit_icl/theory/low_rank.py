"""ΔW = U V^T: the one delta type for weight matrices, of any rank, kept factored.

Exact implicit patches are rank 1 (docs/theory.md §2); compiled patches (§7) are rank k; sums of patches
stay low-rank by concatenating factors. Nothing here builds the dense [out, in] matrix unless asked
(`dense`), because a delta on a model's MLP is applied to a few inputs far more often than it is merged.

Orientation is nn.Linear's: W is [out, in] and ΔW x = U (V^T x). GPT-2's Conv1D stores W as [in, out];
`add_to_` takes `transposed=True` for it, so the factors themselves never change orientation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from implicit_icl.errors import ImplicitICLError, check_last_dim


@dataclass(frozen=True)
class LowRankUpdate:
    """ΔW = U V^T, optionally batched.

    U: [..., out, k]; V: [..., in, k]. Leading dimensions index independent updates (one per prompt,
    position, prefix or stacked expert) and broadcast against the inputs given to `apply`.
    """

    U: Tensor
    V: Tensor

    def __post_init__(self) -> None:
        if self.U.dim() < 2 or self.V.dim() != self.U.dim():
            raise ImplicitICLError(
                f"low-rank factors must be U [..., out, k] and V [..., in, k], got {tuple(self.U.shape)} and "
                f"{tuple(self.V.shape)}"
            )
        if self.U.shape[:-2] != self.V.shape[:-2] or self.U.shape[-1] != self.V.shape[-1]:
            raise ImplicitICLError(
                f"low-rank factors disagree on batch shape or rank: U {tuple(self.U.shape)}, V {tuple(self.V.shape)}"
            )

    @classmethod
    def rank_one(cls, u: Tensor, v: Tensor) -> LowRankUpdate:
        """u v^T from u: [..., out] and v: [..., in]."""
        if u.shape[:-1] != v.shape[:-1]:
            raise ImplicitICLError(
                f"rank-1 factors disagree on their batch shape: u {tuple(u.shape)}, v {tuple(v.shape)}"
            )
        return cls(u.unsqueeze(-1), v.unsqueeze(-1))

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in): the shape of the matrix this update is added to."""
        return self.U.shape[-2], self.V.shape[-2]

    @property
    def rank(self) -> int:
        """k, the number of factor columns (an upper bound on the matrix rank)."""
        return self.U.shape[-1]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.U.shape[:-2])

    def apply(self, x: Tensor) -> Tensor:
        """ΔW x = U (V^T x) without building ΔW.

        x: [*batch_shape, ..., in] -> [*batch_shape, ..., out]: update b acts on every input of batch
        entry b (e.g. all positions of sequence b); an unbatched update acts on every input."""
        check_last_dim("input of the low-rank update", x, self.V.shape[-2])
        batch = self.batch_shape
        if x.shape[: len(batch)] != batch:
            raise ImplicitICLError(
                f"inputs of shape {tuple(x.shape)} do not start with the update's batch shape {batch}"
            )
        rows = x.reshape(*batch, -1, x.shape[-1])  # [*batch, M, in]
        product = (rows @ self.V.to(x)) @ self.U.to(x).transpose(-1, -2)  # [*batch, M, out]
        return product.reshape(*x.shape[:-1], self.U.shape[-2])

    def dense(self) -> Tensor:
        """The matrix U V^T: [..., out, in]. For merging and checks; costs out × in memory."""
        return self.U @ self.V.transpose(-1, -2)

    def inner(self, other: LowRankUpdate) -> Tensor:
        """<ΔW, ΔW'>_F = sum((U^T U') ⊙ (V^T V')) from the factors: [...]."""
        left = self.U.transpose(-1, -2) @ other.U  # [..., k, k']
        right = self.V.transpose(-1, -2) @ other.V
        return (left * right).sum((-1, -2))

    def norm(self) -> Tensor:
        """||U V^T||_F from the factors (for rank 1, ||u|| ||v||, also the spectral norm): [...]."""
        if self.rank == 1:
            return self.U[..., 0].norm(dim=-1) * self.V[..., 0].norm(dim=-1)
        return self.inner(self).clamp_min(0).sqrt()

    def __add__(self, other: LowRankUpdate) -> LowRankUpdate:
        """The sum of two deltas, still low-rank: factors concatenated (rank k + k')."""
        if self.shape != other.shape:
            raise ImplicitICLError(f"cannot add low-rank updates of shapes {self.shape} and {other.shape}")
        return LowRankUpdate(torch.cat([self.U, other.U], -1), torch.cat([self.V, other.V.to(self.V)], -1))

    def to(self, *args, **kwargs) -> LowRankUpdate:
        """Both factors through Tensor.to (dtype and/or device)."""
        return LowRankUpdate(self.U.to(*args, **kwargs), self.V.to(*args, **kwargs))

    def __getitem__(self, index) -> LowRankUpdate:
        """Select among the leading (batch) dimensions."""
        if not self.batch_shape:
            raise ImplicitICLError("this low-rank update is not batched; there is nothing to index")
        return LowRankUpdate(self.U[index], self.V[index])

    @torch.no_grad()
    def add_to_(self, parameter: Tensor, transposed: bool = False) -> None:
        """parameter += U V^T in place, in the parameter's dtype.

        parameter: [out, in], or [in, out] with transposed=True (GPT-2's Conv1D), or stacked matrices
        [E, out, in] for factors batched over E (fused experts)."""
        U, V = self.U.to(parameter), self.V.to(parameter)
        if transposed:
            U, V = V, U
        if parameter.dim() == 3:
            parameter.baddbmm_(U, V.transpose(-1, -2))
        else:
            parameter.addmm_(U, V.T)

    def tensors(self, name: str) -> dict[str, Tensor]:
        """The factors keyed "<name>:U" and "<name>:V", contiguous on the CPU (for safetensors)."""
        return {f"{name}:U": self.U.detach().contiguous().cpu(), f"{name}:V": self.V.detach().contiguous().cpu()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], name: str) -> LowRankUpdate:
        """The inverse of `tensors`."""
        return cls(tensors[f"{name}:U"], tensors[f"{name}:V"])
