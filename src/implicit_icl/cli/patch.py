"""What `implicit-icl patch` and `implicit-icl generate` do, as plain functions returning JSON-ready dicts.

The typer wrappers in cli/app.py only parse options into a `RunOptions` and print; everything that can go
wrong with the input raises ImplicitICLError here with a one-line message.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from implicit_icl.engine.construct import compute_patch
from implicit_icl.engine.forward import model_device
from implicit_icl.engine.generate import patched_generate
from implicit_icl.engine.verify import verify_patch
from implicit_icl.errors import ImplicitICLError
from implicit_icl.models.options import RunOptions


def patch_report(options: RunOptions, drop: tuple[int, int] | None, save: Path | None, peft: Path | None) -> dict:
    """Compute the exact patch, verify it against the context-ful model, optionally save it (our format
    and/or a PEFT LoRA adapter)."""
    loaded, context, query = options.load()
    model = loaded.model
    start = time.perf_counter()
    patch = compute_patch(model, context, query, drop=drop, output=options.output, dtype=options.arithmetic_dtype)
    seconds = time.perf_counter() - start
    verification = verify_patch(model, context, query, patch)
    if save is not None:
        patch.save(save)
    if peft is not None:
        patch.to_peft(peft, model)
    return dict(
        model=loaded.name,
        family=patch.family,
        n_layers=patch.n_layers,
        model_dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        arithmetic_dtype=options.arithmetic,
        output_side=patch.output,
        context_tokens=context.numel(),
        query_tokens=query.numel(),
        drop=list(drop) if drop else None,
        **verification.as_dict(),
        modules=patch.modules,
        changes=patch.summary(),
        seconds=seconds,
        saved_to=str(save) if save is not None else None,
        peft_adapter=str(peft) if peft is not None else None,
    )


def generate_report(options: RunOptions, max_new_tokens: int) -> dict:
    """Greedy generation with the context and without it under per-token patches, and the time per token
    of HF's own cached greedy generation of the same prompt, measured in the same run."""
    loaded, context, query = options.load()
    if not loaded.model.can_generate():
        raise ImplicitICLError(f"{loaded.name} has no language-model head and does not generate; use a decoder")
    generation = patched_generate(
        loaded.model,
        context,
        query,
        max_new_tokens,
        output=options.output,
        dtype=options.arithmetic_dtype,
        progress=True,
    )
    plain = plain_seconds_per_token(loaded.model, torch.cat([context, query]), max_new_tokens)
    report = dict(
        model=loaded.name,
        family=loaded.model.config.model_type,
        model_dtype=str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        arithmetic_dtype=options.arithmetic,
        **generation.as_dict(),
        seconds_per_token_plain=plain,
        patched_to_plain=generation.seconds_per_token_patched / plain,
    )
    if loaded.tokenizer is not None:
        report["text_with_context"] = loaded.tokenizer.decode(generation.tokens_with_context)
        report["text_patched"] = loaded.tokenizer.decode(generation.tokens_patched)
    return report


@torch.no_grad()
def plain_seconds_per_token(model, prompt_ids: torch.Tensor, max_new_tokens: int) -> float:
    """Seconds per token of HF's cached greedy `generate` of exactly max_new_tokens after prompt_ids [T]."""
    ids = prompt_ids.to(model_device(model))[None]

    def generate(n: int) -> None:
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )

    generate(1)  # warm-up: the first call sets up the generation config
    start = time.perf_counter()
    generate(max_new_tokens)
    return (time.perf_counter() - start) / max_new_tokens
