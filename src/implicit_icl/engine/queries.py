"""Many queries after one context: the last-token logits with the context, and without it.

- without the context (`reduced_logits`): each query alone at the positions it has after the context
  (offset .. offset + Q − 1), left-padded so that every query's last token is the last column. Compiled
  patches, task and function vectors, the exact patches and the zero-shot floor all run on this layout.
- with the context (`ContextPrefix`, `context_logits`): the context shared by every query is run once and
  its keys and values are kept (Hugging Face's cache), copied to the batch, then the queries follow. The
  queries but their last tokens are left-padded right after the context (the padding is masked out), so
  the last tokens form one column that can be run again and again from the same cache, e.g. under an
  intervention on the last position; this costs one token per query instead of the whole prompt.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor
from transformers import PreTrainedModel

from implicit_icl.engine.forward import ForwardInputs, model_device, run_model
from implicit_icl.engine.inputs import as_token_ids, check_length
from implicit_icl.errors import ImplicitICLError


def checked_queries(model: PreTrainedModel, queries: Sequence, what: str = "query") -> list[Tensor]:
    """Each query as a non-empty 1-D LongTensor of ids in the vocabulary (one-line error otherwise)."""
    if len(queries) == 0:
        raise ImplicitICLError(f"no {what} given; give at least one")
    checked = [as_token_ids(f"{what} {index}", query, model) for index, query in enumerate(queries)]
    for index, query in enumerate(checked):
        if query.numel() == 0:
            raise ImplicitICLError(f"{what} {index} is empty; give at least one token per {what}")
    return checked


@contextmanager
def last_position_head(model: PreTrainedModel) -> Iterator[None]:
    """Inside the block, the output head reads only the last position ([B, T, d] -> [B, 1, d]): the logits
    of earlier positions, which nothing here uses, would cost as much as a third of the pass."""
    head = model.get_output_embeddings()
    if head is None:  # an encoder without a head: nothing to save
        yield
        return
    handle = head.register_forward_pre_hook(lambda module, args: (args[0][:, -1:], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def reduced_inputs(queries: Sequence[Tensor], offset: int) -> ForwardInputs:
    """The queries alone, left-padded, query i at positions offset .. offset + len_i − 1: [B, S]."""
    positions = [offset + torch.arange(query.numel()) for query in queries]
    return ForwardInputs.padded(list(queries), positions, side="left")


@torch.no_grad()
def reduced_logits(model: PreTrainedModel, queries: Sequence[Tensor], offset: int, batch_size: int = 32) -> Tensor:
    """Next-token logits after each query alone at positions offset.. (see `reduced_inputs`): [N, V], float32,
    on the CPU. Whatever patch or hook is active on the model acts on these runs."""
    device = model_device(model)
    rows = []
    for start in range(0, len(queries), batch_size):
        chunk = queries[start : start + batch_size]
        with last_position_head(model):
            rows.append(run_model(model, reduced_inputs(chunk, offset).to(device))[:, -1].float().cpu())
    return torch.cat(rows)


class ContextPrefix:
    """A context followed by B queries, run up to (not including) every query's last token, kept in a cache.

    `last_logits()` runs the last tokens (one column) and returns their next-token logits [B · repeats, V];
    the cache is cut back afterwards, so it can be called again, e.g. once per intervention on the last
    position. repeats: every query's row is copied `repeats` times (row b · repeats + c), so that one call
    can try `repeats` interventions at once, each on its own copies. An empty context gives the queries
    alone, their first tokens at position `start` (default: the context's length)."""

    @torch.no_grad()
    def __init__(
        self,
        model: PreTrainedModel,
        context_ids: Tensor,
        queries: Sequence[Tensor],
        repeats: int = 1,
        start: int | None = None,
    ):
        self.model, device = model, model_device(model)
        context = context_ids.to(device)
        n_context, n_queries = context.numel(), len(queries)
        start = n_context if start is None else start
        if n_context and start != n_context:
            raise ImplicitICLError(f"queries after a context of {n_context} tokens start at {n_context}, not {start}")
        check_length(model, start + max(query.numel() for query in queries))
        self.cache, self.mask = None, torch.ones(n_queries, n_context, dtype=torch.long, device=device)
        if n_context:
            self.cache = self._run(context[None], torch.arange(n_context, device=device)[None], self.mask[:1])
            self.cache.batch_repeat_interleave(n_queries)
        heads = [query[:-1].to(device) for query in queries]
        if max(head.numel() for head in heads):  # queries of one token have nothing before their last token
            padded = ForwardInputs.padded(heads, [start + torch.arange(h.numel(), device=device) for h in heads])
            self.mask = torch.cat([self.mask, padded.attention_mask], 1)
            self.cache = self._run(padded.input_ids, padded.position_ids, self.mask)
        if self.cache is not None and repeats > 1:
            self.cache.batch_repeat_interleave(repeats)
        self.mask = self.mask.repeat_interleave(repeats, 0)
        last_ids = torch.stack([query[-1] for query in queries]).to(device)
        last_positions = torch.tensor([start + query.numel() - 1 for query in queries], device=device)
        self.last_ids = last_ids.repeat_interleave(repeats)[:, None]
        self.last_positions = last_positions.repeat_interleave(repeats)[:, None]

    def _run(self, input_ids: Tensor, position_ids: Tensor, mask: Tensor):
        with last_position_head(self.model):
            out = self.model(
                input_ids=input_ids, position_ids=position_ids, attention_mask=mask, cache=self.cache, use_cache=True
            )
        return out.cache

    @torch.no_grad()
    def last_logits(self) -> Tensor:
        """Next-token logits after each query's last token: [B · repeats, V], float32, on the CPU."""
        mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], 1)
        cache = self.cache
        # A sliding-window cache forgets what it evicts and cannot be cut back: run those on a copy.
        croppable = cache is not None and not any(getattr(layer, "is_sliding", False) for layer in cache.layers)
        if cache is not None and not croppable:
            cache = copy.deepcopy(cache)
        try:
            out = self.model(
                input_ids=self.last_ids,
                position_ids=self.last_positions,
                attention_mask=mask,
                cache=cache,
                use_cache=cache is not None,
            )
        finally:
            if croppable and cache.get_seq_length() == self.mask.shape[1] + 1:
                cache.crop(-1)
        return out.logits[:, -1].float().cpu()


def context_logits(
    model: PreTrainedModel, context_ids: Tensor, queries: Sequence[Tensor], batch_size: int = 32
) -> Tensor:
    """Next-token logits after context + query for each query (in-context learning): [N, V], float32, CPU."""
    rows = [
        ContextPrefix(model, context_ids, queries[start : start + batch_size]).last_logits()
        for start in range(0, len(queries), batch_size)
    ]
    return torch.cat(rows)
