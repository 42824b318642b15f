"""Greedy generation with the context, and without it under per-token patches ([G]).

A patch is specific to one token at one position, so generating T tokens without the context takes T
patches: at each step the newest token alone, at its absolute position, under the patch computed for it
from the sequence so far. If every patch is exact, both paths pick the same tokens.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from rich.console import Console
from rich.progress import track
from torch import Tensor
from transformers import PreTrainedModel

from implicit_icl.engine.construct import compute_patch
from implicit_icl.engine.forward import ForwardInputs, model_device, run_model
from implicit_icl.engine.growing import GrowingContext, Step, one_token
from implicit_icl.engine.inputs import TokenIds, check_length, patch_input
from implicit_icl.errors import ImplicitICLError


@dataclass(frozen=True)
class Generation:
    """Generated ids of both paths and how often they agree.

    agreement: free-running, the fraction of steps at which the patched path (fed its own tokens) picked
    the context's token. teacher_forced_agreement: the fraction of steps at which the patched top-1, for
    the context-ful path's own prefix, is the context's top-1. seconds_per_token_patched: the patched
    path's time per token (its patches and passes, not the context-ful path's)."""

    tokens_with_context: list[int]
    tokens_patched: list[int]
    agreement: float
    teacher_forced_agreement: float
    seconds_per_token_patched: float

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def patched_generate(
    model: PreTrainedModel,
    context_ids: TokenIds,
    query_ids: TokenIds,
    max_new_tokens: int,
    output: str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    via: str = "auto",
    cache: bool = True,
) -> Generation:
    """Generate `max_new_tokens` greedily after context + query, and without the context (each step's
    newest token alone under its own exact patch; output and dtype as in `compute_patch`).

    via: how each patch is applied (`Patch.applied`). In bfloat16, "weights" rounds W + ΔW to the
    model's precision; "hooks" keeps W as it is and adds the delta's effect to the module outputs. With
    the cache, "auto" and "hooks" take the logits from the pass that builds the patch, which applies it
    as hooks do; "weights" runs the token once more, with the patch in the weights.
    cache: keep the context-ful keys and values (engine/growing.py), so that a token costs a few
    one-token passes; False re-reads the whole sequence for every token (the reference)."""
    if not model.can_generate():
        raise ImplicitICLError(f"{type(model).__name__} has no language-model head to generate with; use a decoder")
    if max_new_tokens < 1:
        raise ImplicitICLError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    inputs = patch_input(model, context_ids, query_ids)
    check_length(model, inputs.full.numel() + max_new_tokens - 1)
    prompt = inputs.full.to(model_device(model))
    steps = range(max_new_tokens)
    if progress:
        steps = track(steps, description="generating", console=Console(stderr=True), transient=True)
    paths = (
        _CachedPaths(model, prompt, output, dtype, via) if cache else _UncachedPaths(model, prompt, output, dtype, via)
    )
    with_context, forced, patched, seconds = [], [], [], 0.0
    for _ in steps:
        context_top, forced_top = paths.context_step()
        start = time.perf_counter()
        patched.append(paths.patched_step())
        seconds += time.perf_counter() - start
        with_context.append(context_top)
        forced.append(forced_top)
    return Generation(
        with_context,
        patched,
        agreement=_fraction_equal(with_context, patched),
        teacher_forced_agreement=_fraction_equal(with_context, forced),
        seconds_per_token_patched=seconds / max_new_tokens,
    )


def _fraction_equal(first: list[int], second: list[int]) -> float:
    return sum(a == b for a, b in zip(first, second, strict=True)) / len(first)


class _CachedPaths:
    """Both paths on growing key-value caches. The context-ful path's step also gives the patched top-1
    for its own prefix (teacher forcing); the patched path runs on its own tokens."""

    def __init__(self, model, prompt: Tensor, output, dtype, via) -> None:
        self.model, self.via = model, via
        self.with_context = GrowingContext(model, prompt[:-1], output, dtype)
        self.patched = GrowingContext(model, prompt[:-1], output, dtype)
        self.context_token = self.patched_token = int(prompt[-1])

    def context_step(self) -> tuple[int, int]:
        """The context's next token, and the patched top-1 at the same step of the same sequence."""
        step = self.with_context.step(self.context_token, head=True)
        self.context_token = int(step.context_logits.argmax())
        return self.context_token, int(self._patched_logits(step).argmax())

    def patched_step(self) -> int:
        """The patched path's next token, the newest alone under its patch."""
        self.patched_token = int(self._patched_logits(self.patched.step(self.patched_token)).argmax())
        return self.patched_token

    def _patched_logits(self, step: Step) -> Tensor:
        if self.via != "weights":
            return step.patched_logits
        (position,) = step.patch.sources[0].kept
        with step.patch.applied(self.model, via="weights"):
            token = step.patch.sources[0].query_ids[0]
            return run_model(self.model, one_token(token, position, self.with_context.device))[0, -1]


class _UncachedPaths:
    """Both paths re-reading their whole sequences at every step: `compute_patch` from scratch."""

    def __init__(self, model, prompt: Tensor, output, dtype, via) -> None:
        self.model, self.output, self.dtype, self.via = model, output, dtype, via
        self.with_context, self.patched = prompt, prompt

    def context_step(self) -> tuple[int, int]:
        logits = run_model(self.model, ForwardInputs.plain(self.with_context[None]))[0, -1]
        forced = self._patched_top(self.with_context)
        self.with_context = torch.cat([self.with_context, logits.argmax()[None].to(self.with_context.device)])
        return int(self.with_context[-1]), forced

    def patched_step(self) -> int:
        token = self._patched_top(self.patched)
        self.patched = torch.cat([self.patched, torch.tensor([token], device=self.patched.device)])
        return token

    def _patched_top(self, sequence: Tensor) -> int:
        """The top-1 of the sequence's last token alone, under its patch for the tokens before it."""
        patch = compute_patch(self.model, sequence[:-1], sequence[-1:], output=self.output, dtype=self.dtype)
        with patch.applied(self.model, via=self.via):
            logits = run_model(self.model, one_token(int(sequence[-1]), sequence.numel() - 1, sequence.device))
        return int(logits[0, -1].argmax())
