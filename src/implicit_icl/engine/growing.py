"""Exact patches for a sequence that grows one token at a time, from a key-value cache.

Generating without the context takes, at every step, the patch of the newest token with everything before
it as its context. `compute_patch` would re-read the whole sequence for each. Here the context-ful keys
and values stay in a cache, so a new token costs two one-token passes: a cached context-ful step that
records the token's states (`record_context`, stopped before the head), and one pass of the token alone
that builds each layer's patch as it reaches it and runs on through the patched layers to the logits
(`patched_token_logits`). The layers' patches are those `compute_patch` builds, up to rounding: each is
solved for the input its layer actually gets, which equals the context-ful one when every patch below is
exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

from implicit_icl.engine.apply import Patch
from implicit_icl.engine.capture import record_context
from implicit_icl.engine.construct import assemble_patch, check_settings, patched_token_logits
from implicit_icl.engine.forward import ForwardInputs, StopForward, model_device, run_model
from implicit_icl.engine.spec import layers_of, spec_for
from implicit_icl.patch import Source


def one_token(token: int, position: int, device: torch.device) -> ForwardInputs:
    """A sequence of one token at an absolute position: ids and positions [1, 1]."""
    return ForwardInputs.plain(torch.tensor([[token]], device=device), torch.tensor([[position]], device=device))


@torch.no_grad()
def prefilled_cache(model: PreTrainedModel, ids: Tensor, cache: DynamicCache | None = None) -> DynamicCache:
    """The keys and values of ids [T] (T ≥ 1), from one run stopped once the last layer's attention has
    cached them. cache: the one to fill (default: laid out by the model's config, so that sliding-window
    layers keep only their window)."""
    cache = DynamicCache(config=model.config) if cache is None else cache
    with _stopped_once_stored(cache, len(layers_of(model, spec_for(model))) - 1):
        run_model(model, ForwardInputs.plain(ids[None]), cache)
    return cache


@contextmanager
def _stopped_once_stored(cache: DynamicCache, last_layer: int) -> Iterator[None]:
    """The run stops as soon as the last layer has stored its keys and values: its attention itself is not
    needed (every supported decoder's last layer stores its own; tests/test_generate_cache.py checks it)."""
    update = cache.update

    def store_then_stop(key_states, value_states, layer_idx, *args, **kwargs):
        keys_values = update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == last_layer:
            raise StopForward
        return keys_values

    cache.update = store_then_stop
    try:
        yield
    finally:
        del cache.update


@dataclass(frozen=True)
class Step:
    """One appended token: its patch, the logits [V] of the token alone under it, and (when asked) the
    logits [V] of the token after the sequence, with the context."""

    patch: Patch
    patched_logits: Tensor
    context_logits: Tensor | None


class GrowingContext:
    """The context-ful keys and values of a sequence, and the exact patch of each token appended to it.

    output, dtype: as in `compute_patch`."""

    def __init__(self, model: PreTrainedModel, prefix_ids: Tensor, output: str | None, dtype: torch.dtype) -> None:
        """prefix_ids: [T] the sequence so far (T ≥ 1: the first patched token needs a context)."""
        self.model = model
        self.spec, self.output = check_settings(model, output, dtype)
        self.dtype = dtype
        self.device = model_device(model)
        self.ids = prefix_ids.tolist()
        self.cache = prefilled_cache(model, prefix_ids.to(self.device))

    @torch.no_grad()
    def step(self, token: int, head: bool = False) -> Step:
        """The exact patch that makes `token`, alone at position len(sequence), produce what it produces
        after the sequence so far, with the logits of the token alone under it (and with head=True, the
        context-ful logits too); the token then joins the sequence."""
        position = len(self.ids)
        step = one_token(token, position, self.device)
        rows = torch.zeros(1, 2, dtype=torch.long, device=self.device)  # sequence 0, index 0 of the step
        states = record_context(self.model, self.spec, step, rows, replay=True, cache=self.cache, head=head)
        deltas, logits = patched_token_logits(self.model, self.spec, states, step, self.output, self.dtype)
        source = Source(tuple(self.ids), (token,), (position,))
        self.ids.append(token)
        patch = assemble_patch(self.model, deltas, self.output, self.dtype, [source], None)[0]
        return Step(patch, logits[0], None if states.logits is None else states.logits[0, -1])
