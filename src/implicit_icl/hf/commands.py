"""What `implicit-icl patch` and `implicit-icl generate` do, as plain functions returning JSON-ready dicts.

The CLI wrappers in cli.py only parse options into a `RunOptions` and print; everything that can go wrong
with the user's input raises ImplicitICLError here with a one-line message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from implicit_icl.errors import ImplicitICLError
from implicit_icl.hf.construct import compute_patch
from implicit_icl.hf.generate import patched_generate
from implicit_icl.hf.load import MODEL_DTYPES, LoadedModel, load_model
from implicit_icl.hf.verify import verify_patch

ARITHMETIC_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class RunOptions:
    """The options every command on a model, a context and a query shares.

    model: a .gguf file, a Hugging Face directory or hub name, or None for the default model; dtype: the
    model's weights ("float32", "float64", "bfloat16"); context / context_file / context_ids and query /
    query_ids: exactly one of each kind (ids are space-separated integers); arithmetic: the patch's
    dtype ("float32" or "float64"); output: the output side (None: the family's default).
    """

    model: str | None = None
    dtype: str = "float32"
    context: str | None = None
    context_file: Path | None = None
    context_ids: str | None = None
    query: str | None = None
    query_ids: str | None = None
    arithmetic: str = "float32"
    output: str | None = None

    def __post_init__(self) -> None:  # fail before the model loads
        if self.dtype not in MODEL_DTYPES:
            raise ImplicitICLError(f"unknown --dtype {self.dtype!r}; choose one of {', '.join(MODEL_DTYPES)}")
        if self.arithmetic not in ARITHMETIC_DTYPES:
            raise ImplicitICLError(f"unknown --arithmetic {self.arithmetic!r}; choose float32 or float64")

    @property
    def arithmetic_dtype(self) -> torch.dtype:
        return ARITHMETIC_DTYPES[self.arithmetic]

    def load(self) -> tuple[LoadedModel, torch.Tensor, torch.Tensor]:
        """The model, and the context and query ids [T] (ImplicitICLError, one line, for bad input)."""
        loaded = load_model(self.model, self.dtype)
        context = token_ids(loaded, "context", self.context, self.context_file, self.context_ids)
        return loaded, context, token_ids(loaded, "query", self.query, None, self.query_ids)


def token_ids(
    loaded: LoadedModel, what: str, text: str | None, text_file: Path | None, ids: str | None
) -> torch.Tensor:
    """The ids [T] of the context or query from exactly one of: text, a text file, space-separated ids."""
    given = [option for option, value in (("", text), ("-file", text_file), ("-ids", ids)) if value is not None]
    if len(given) != 1:
        options = f"--{what}, --{what}-file or --{what}-ids" if what == "context" else f"--{what} or --{what}-ids"
        raise ImplicitICLError(f"give exactly one of {options} (got {len(given)})")
    if ids is not None:
        return parse_ids(ids, f"--{what}-ids")
    if text_file is not None:
        try:
            text = Path(text_file).read_text()
        except OSError as error:
            raise ImplicitICLError(f"cannot read --{what}-file: {error}") from None
    if loaded.tokenizer is None:
        raise ImplicitICLError(f"{loaded.name} has no tokenizer; pass token ids with --{what}-ids instead of text")
    plain = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    if what == "context":
        plain = _with_leading_special_tokens(loaded.tokenizer, text, plain)
    return torch.tensor(plain, dtype=torch.long)


def parse_ids(ids: str, option: str) -> torch.Tensor:
    """Token ids separated by spaces (or commas) -> LongTensor [T]; one ImplicitICLError line otherwise."""
    try:
        return torch.tensor([int(token) for token in ids.replace(",", " ").split()], dtype=torch.long)
    except ValueError:
        raise ImplicitICLError(f"{option} must be integers separated by spaces, got {ids!r}") from None


def _with_leading_special_tokens(tokenizer, text: str, plain: list[int]) -> list[int]:
    """The context opens with the tokenizer's leading special tokens (BOS, [CLS]) but does not end with its
    closing ones ([SEP], EOS): the query continues it."""
    full = tokenizer(text)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start] + plain
    return plain


def parse_drop(drop: str | None) -> tuple[int, int] | None:
    """'START:END' -> (START, END); bounds are checked against the context by the engine."""
    if drop is None:
        return None
    try:
        start, end = (int(part) for part in drop.split(":"))
    except ValueError:
        raise ImplicitICLError(f"--drop must look like START:END (two integers), got {drop!r}") from None
    return start, end


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
    """Greedy generation with the context and without it under per-token patches."""
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
    report = dict(
        model=loaded.name,
        family=loaded.model.config.model_type,
        arithmetic_dtype=options.arithmetic,
        **generation.as_dict(),
    )
    if loaded.tokenizer is not None:
        report["text_with_context"] = loaded.tokenizer.decode(generation.tokens_with_context)
        report["text_patched"] = loaded.tokenizer.decode(generation.tokens_patched)
    return report
