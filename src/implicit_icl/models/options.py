"""The options every command on a model shares (`RunOptions`): which model, its dtype, the context and the
query as text, a file or token ids; parsed here so that bad input fails in one line before the model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from implicit_icl.errors import ImplicitICLError
from implicit_icl.models.load import MODEL_DTYPES, LoadedModel, load_model

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
