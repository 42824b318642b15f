"""Contextual blocks built from plain PyTorch modules, and their exact implicit updates.

The user brings a contextual layer A (self-attention, an RNN, anything that reads a sequence) and an MLP
whose first layer is an `nn.Linear`. Two block forms are covered (docs/theory.md §2–3):

    skip=False:  y = MLP(A(s))                                    [D, Thm 2.2]
    skip=True:   r = s + A(s),  y = r' + MLP(norm(z))              [D appendix; I, eq. 27–28]
                 with z = A(s) and r' = s + A(s) when mlp_reads="attention" ([D]'s skip block),
                 or z = r' = r when mlp_reads="residual" (a pre-LayerNorm residual block).

Sequences are [T, d]; the contextual layer must map [..., T, d] -> [..., T, m] (causal or not) so that
every position's own update can be evaluated in one batched call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from implicit_icl.errors import ImplicitICLError, check_finite
from implicit_icl.theory import ImplicitUpdate, LowRankUpdate, rank_one_update, residual_update


@dataclass(frozen=True)
class BlockStates:
    """The quantities the updates are built from, at every position: [..., T, ·]."""

    residual: Tensor | None  # r', the stream the MLP output is added to; None without skip
    mlp_input: Tensor  # z after the norm: what the first MLP matrix reads


class ContextualBlock(nn.Module):
    """A contextual layer followed by an MLP, with or without a skip connection around it."""

    def __init__(
        self,
        contextual: Callable[[Tensor], Tensor],
        mlp: nn.Module,
        *,
        skip: bool = False,
        mlp_reads: Literal["attention", "residual"] = "residual",
        norm: Callable[[Tensor], Tensor] | None = None,
        first_layer: nn.Linear | None = None,
    ) -> None:
        super().__init__()
        self.contextual = contextual
        self.mlp = mlp
        self.skip = skip
        self.mlp_reads = mlp_reads
        self.norm = norm if norm is not None else nn.Identity()
        self.first_layer = first_layer if first_layer is not None else _first_linear(mlp)

    def states(self, sequence: Tensor) -> BlockStates:
        """sequence: [..., T, d] -> the block's residual and MLP input at every position."""
        attention = self.contextual(sequence)
        if not self.skip:
            return BlockStates(None, self.norm(attention))
        residual = sequence + attention
        mlp_input = residual if self.mlp_reads == "residual" else attention
        return BlockStates(residual, self.norm(mlp_input))

    def forward(self, sequence: Tensor, update: ImplicitUpdate | None = None) -> Tensor:
        """Run the block on [..., T, d] -> [..., T, d_out], with W + ΔW and the output shift if given.

        A batched update (one per sequence of a batch) broadcasts over positions: u, v [B, ·] act on
        every position of sequence b.
        """
        states = self.states(sequence)
        with _added_to_output(self.first_layer, update.weight if update else None):
            output = self.mlp(states.mlp_input)
        if states.residual is not None:
            output = states.residual + output
            if update is not None and update.bias_shift is not None:
                output = output + update.bias_shift.unsqueeze(-2)
        return output

    def update_for_query(self, context: Tensor, query: Tensor) -> ImplicitUpdate:
        """The update that lets the query alone reproduce the block's output after the whole context.

        context: [n, d] (n ≥ 1); query: [d].
        """
        _check_context(context, query)
        return self._update(torch.cat([context, query[None]]), query[None])

    def update_for_portion(self, context: Tensor, query: Tensor, portion: slice | Sequence[int]) -> ImplicitUpdate:
        """ΔW(Y) for a portion Y of the context: the block run on [C \\ Y, x] with it equals T(C, x).

        portion: a slice or indices into the n context tokens; it must select at least one of them.
        """
        _check_context(context, query)
        removed = torch.zeros(context.shape[0], dtype=torch.bool)
        try:
            removed[portion] = True
        except IndexError as error:
            raise ImplicitICLError(
                f"portion {portion} is out of range for a context of {context.shape[0]} tokens"
            ) from error
        if not removed.any():
            raise ImplicitICLError("the portion Y selects no context token; give at least one index to remove")
        reduced = torch.cat([context[~removed], query[None]])
        return self._update(torch.cat([context, query[None]]), reduced)

    def update_for_last_tokens(self, sequences: Tensor) -> ImplicitUpdate:
        """`update_for_query` for a batch: each sequence's context is all but its last token.

        sequences: [..., T, d] with T ≥ 2 -> batched update with factors [..., ·].
        """
        if sequences.dim() < 2 or sequences.shape[-2] < 2:
            raise ImplicitICLError(
                f"expected sequences [..., T, d] with T ≥ 2 (a context and a query), got {tuple(sequences.shape)}"
            )
        check_finite("sequences", sequences)
        return self._update(sequences, sequences[..., -1:, :])

    def updates_every_position(self, sequence: Tensor) -> ImplicitUpdate:
        """Each position's own update (its context: the tokens before it; its reference: itself alone).

        sequence: [T, d] -> batched update with u [T, ·], v [T, ·]; run it with `forward_every_position`.
        """
        _check_sequence(sequence)
        full = self.states(sequence)
        alone = self.states(sequence[:, None, :])  # T one-token sequences
        return self._solve(full, _last(alone))

    def forward_every_position(self, sequence: Tensor, updates: ImplicitUpdate) -> Tensor:
        """Every token alone, under its own update: [T, d] -> [T, d_out]."""
        return self(sequence[:, None, :], updates)[:, 0]

    def _update(self, sequence: Tensor, reduced: Tensor) -> ImplicitUpdate:
        return self._solve(_last(self.states(sequence)), _last(self.states(reduced)))

    def _solve(self, with_context: BlockStates, reduced: BlockStates) -> ImplicitUpdate:
        weight = self.first_layer.weight
        if with_context.residual is None:
            return ImplicitUpdate(rank_one_update(weight, with_context.mlp_input, reduced.mlp_input))
        return residual_update(
            weight, with_context.residual, reduced.residual, with_context.mlp_input, reduced.mlp_input
        )


def _last(states: BlockStates) -> BlockStates:
    """The states at the last position of each sequence: [..., T, ·] -> [..., ·]."""
    residual = None if states.residual is None else states.residual[..., -1, :]
    return BlockStates(residual, states.mlp_input[..., -1, :])


def _first_linear(mlp: nn.Module) -> nn.Linear:
    for module in mlp.modules():
        if isinstance(module, nn.Linear):
            return module
    raise ImplicitICLError("the MLP has no nn.Linear layer; pass first_layer= the matrix the update applies to")


def _check_sequence(sequence: Tensor) -> None:
    if sequence.dim() != 2 or sequence.shape[0] == 0:
        raise ImplicitICLError(f"expected a non-empty sequence [T, d], got shape {tuple(sequence.shape)}")
    check_finite("sequence", sequence)


def _check_context(context: Tensor, query: Tensor) -> None:
    if context.dim() != 2 or context.shape[0] == 0:
        raise ImplicitICLError(f"the context must be a non-empty [n, d] matrix, got shape {tuple(context.shape)}")
    if query.shape != context.shape[1:]:
        raise ImplicitICLError(
            f"the query has shape {tuple(query.shape)} but context tokens are {context.shape[1]}-dim"
        )
    check_finite("context", context)
    check_finite("query", query)


@contextmanager
def _added_to_output(linear: nn.Linear, update: LowRankUpdate | None):
    """Run `linear` as W + ΔW by adding ΔW x = U (Vᵀ x) to its output: no dense matrix, weights untouched.

    A batched update [B] meets inputs [B, T, in]: each sequence gets its own update.
    """
    if update is None:
        yield
        return

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        (x,) = inputs
        return output + update.apply(x)

    handle = linear.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
