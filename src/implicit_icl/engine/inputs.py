"""Token ids in, checked: what the context, query and removed span are, and the reduced input they give."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel

from implicit_icl.errors import ImplicitICLError

TokenIds = Tensor | Sequence[int]


def as_token_ids(name: str, ids: TokenIds, model: PreTrainedModel) -> Tensor:
    """A 1-D LongTensor of ids, each in [0, vocab_size). Accepts [T], [1, T] or a list of ints."""
    ids = torch.as_tensor(ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.is_floating_point():
        raise ImplicitICLError(f"{name} must be one sequence of integer token ids, got shape {tuple(ids.shape)}")
    vocab = model.config.vocab_size
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
        raise ImplicitICLError(
            f"{name} holds token id {int(ids.max() if ids.max() >= vocab else ids.min())} outside the model's "
            f"vocabulary [0, {vocab}); use ids from the model's tokenizer"
        )
    return ids.long()


def max_positions(model: PreTrainedModel) -> int | None:
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def check_length(model: PreTrainedModel, length: int) -> None:
    limit = max_positions(model)
    if limit is not None and length > limit:
        raise ImplicitICLError(
            f"context and query hold {length} tokens but the model takes at most {limit} positions; shorten the context"
        )


@dataclass(frozen=True)
class PatchInput:
    """The context-ful sequence and the reduced one the patched model will see.

    full: [T] ids of context then query (the last `query_length` of them). kept: [S] absolute positions
    of the reduced input (the context without the span `drop`, then the query); the patched token is
    the last one, at position T − 1.
    """

    full: Tensor
    kept: Tensor
    query_length: int


def checked_pair(model: PreTrainedModel, context_ids: TokenIds, query_ids: TokenIds, why: str) -> tuple[Tensor, Tensor]:
    """The context and query ids [C], [Q], each non-empty, in the vocabulary, and together within the model's
    positions; `why` says what an empty context leaves nothing for."""
    context = as_token_ids("context ids", context_ids, model)
    query = as_token_ids("query ids", query_ids, model)
    if context.numel() == 0:
        raise ImplicitICLError(f"the context is empty, so {why}; give a context")
    if query.numel() == 0:
        raise ImplicitICLError("the query is empty; give at least one query token")
    check_length(model, context.numel() + query.numel())
    return context, query


def patch_input(
    model: PreTrainedModel, context_ids: TokenIds, query_ids: TokenIds, drop: tuple[int, int] | None = None
) -> PatchInput:
    """Check the ids and the span to remove (default: the whole context, so the query stays alone)."""
    context, query = checked_pair(model, context_ids, query_ids, "there is nothing to turn into a patch")
    n = context.numel()
    if drop is not None:
        start, end = drop
        if not 0 <= start < end <= n:
            raise ImplicitICLError(
                f"--drop {start}:{end} is not a non-empty span inside the context of {n} tokens; "
                f"use START:END with 0 <= START < END <= {n}"
            )
    start, end = drop if drop is not None else (0, n)
    positions = torch.arange(n + query.numel())
    kept = positions[(positions < start) | (positions >= end)]
    return PatchInput(torch.cat([context, query]), kept, query.numel())
