"""Greedy generation with the context, and without it under per-token patches ([G]).

A patch is specific to one token at one position, so generating T tokens without the context takes T
patches: at each step the newest token alone, at its absolute position, under the patch computed for it
from the sequence so far. If every patch is exact, both paths pick the same tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from rich.console import Console
from rich.progress import track
from transformers import PreTrainedModel

from implicit_icl.engine.construct import compute_patch
from implicit_icl.engine.forward import ForwardInputs, model_device, run_model
from implicit_icl.engine.inputs import TokenIds, check_length, patch_input
from implicit_icl.errors import ImplicitICLError


@dataclass(frozen=True)
class Generation:
    """Generated ids of both paths; agreement is the fraction of steps that picked the same token."""

    tokens_with_context: list[int]
    tokens_patched: list[int]
    agreement: float

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
) -> Generation:
    """Generate `max_new_tokens` greedily after context + query, and without the context (each step's
    newest token alone under its own exact patch; output and dtype as in `compute_patch`).

    via: how each patch is applied (`Patch.applied`). In bfloat16, "weights" rounds W + ΔW to the
    model's precision; "hooks" keeps W as it is and adds the delta's effect to the module outputs."""
    if not model.can_generate():
        raise ImplicitICLError(f"{type(model).__name__} has no language-model head to generate with; use a decoder")
    if max_new_tokens < 1:
        raise ImplicitICLError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    inputs = patch_input(model, context_ids, query_ids)
    check_length(model, inputs.full.numel() + max_new_tokens - 1)
    device = model_device(model)
    with_context = inputs.full.to(device)
    patched = with_context.clone()
    steps = range(max_new_tokens)
    if progress:
        steps = track(steps, description="generating", console=Console(stderr=True), transient=True)
    for _ in steps:
        logits = run_model(model, ForwardInputs.plain(with_context[None]))
        with_context = torch.cat([with_context, logits[0, -1].argmax()[None].to(device)])
        patch = compute_patch(model, patched[:-1], patched[-1:], output=output, dtype=dtype)
        position = torch.tensor([[patched.numel() - 1]], device=device)
        with patch.applied(model, via=via):
            logits = run_model(model, ForwardInputs.plain(patched[-1:][None], position))
        patched = torch.cat([patched, logits[0, -1].argmax()[None].to(device)])  # the head may sit elsewhere
    new_with_context = with_context[-max_new_tokens:].tolist()
    new_patched = patched[-max_new_tokens:].tolist()
    agreement = sum(a == b for a, b in zip(new_with_context, new_patched, strict=True)) / max_new_tokens
    return Generation(new_with_context, new_patched, agreement)
