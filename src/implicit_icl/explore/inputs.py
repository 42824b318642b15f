"""The explorer's requests, checked: a JSON object in, token ids out, or one ImplicitICLError line.

A prompt is given as text (models with a tokenizer: "context" and "query", split where the query's own
tokens begin, `tasks.encoding.split_ids`) or as ids ("context_ids" and "query_ids", lists of integers, for
models without one). Text and token counts are capped so that one request cannot hold the server for long.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from implicit_icl.engine.inputs import checked_pair
from implicit_icl.errors import ImplicitICLError
from implicit_icl.models.load import LoadedModel
from implicit_icl.tasks.encoding import split_ids, token_ids

MAX_CHARS = 4000  # of any one text field
MAX_CONTEXT_TOKENS = 400  # dynamics costs one patch per prefix: keep a request to seconds
MAX_QUERIES = 16  # new queries of one compile request
MAX_CALIBRATION = 64
MAX_TOP_K = 20


@dataclass(frozen=True)
class PromptIds:
    """A checked prompt: context ids [C] and query ids [Q], both non-empty."""

    context: Tensor
    query: Tensor


def text_field(payload: dict, name: str, required: bool = True, allow_empty: bool = False) -> str | None:
    """payload[name] as a string of at most MAX_CHARS characters (None when absent and not required)."""
    value = payload.get(name)
    if value is None:
        if required:
            raise ImplicitICLError(f"the request has no {name!r}; give it as a string")
        return None
    if not isinstance(value, str):
        raise ImplicitICLError(f"{name!r} must be a string, got {type(value).__name__}")
    if not value and not allow_empty:
        raise ImplicitICLError(f"{name!r} is empty; give some text")
    if len(value) > MAX_CHARS:
        raise ImplicitICLError(f"{name!r} holds {len(value)} characters, more than {MAX_CHARS}; shorten it")
    return value


def ids_field(payload: dict, name: str) -> list[int]:
    """payload[name] as a non-empty list of integers (booleans are not integers here)."""
    value = payload.get(name)
    if value is None:
        raise ImplicitICLError(f"the request has no {name!r}; give it as a list of integer token ids")
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ImplicitICLError(f"{name!r} must be a list of integer token ids")
    if not value:
        raise ImplicitICLError(f"{name!r} is empty; give at least one token id")
    return value


def int_field(payload: dict, name: str, default: int, low: int, high: int) -> int:
    value = payload.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ImplicitICLError(f"{name!r} must be an integer in {low}..{high}, got {value!r}")
    return value


def check_object(payload: object, known: set[str]) -> dict:
    """The request body as a dict with only known keys."""
    if not isinstance(payload, dict):
        raise ImplicitICLError(f"the request body must be a JSON object, got {type(payload).__name__}")
    unknown = sorted(set(payload) - known)
    if unknown:
        raise ImplicitICLError(f"unknown field {unknown[0]!r}; known fields: {', '.join(sorted(known))}")
    return payload


def prompt_ids(loaded: LoadedModel, payload: dict) -> PromptIds:
    """The prompt's context and query ids from text ("context", "query") or ids ("context_ids", "query_ids")."""
    as_text = "context" in payload or "query" in payload
    as_ids = "context_ids" in payload or "query_ids" in payload
    if as_text == as_ids:
        raise ImplicitICLError("give the prompt as 'context' and 'query' (text) or as 'context_ids' and 'query_ids'")
    if as_ids:
        context, query = ids_field(payload, "context_ids"), ids_field(payload, "query_ids")
    else:
        context_text, query_text = text_field(payload, "context"), text_field(payload, "query")
        if loaded.tokenizer is None:
            raise ImplicitICLError(f"{loaded.name} has no tokenizer; give 'context_ids' and 'query_ids' instead")
        context, query = split_ids(loaded.tokenizer, context_text, query_text)
    if len(context) > MAX_CONTEXT_TOKENS:
        raise ImplicitICLError(
            f"the context holds {len(context)} tokens, more than the explorer's {MAX_CONTEXT_TOKENS}; shorten it"
        )
    context_ids, query_ids = checked_pair(loaded.model, context, query, "there is nothing to patch")
    return PromptIds(context_ids, query_ids)


def target_token(loaded: LoadedModel, payload: dict) -> int | None:
    """The followed answer token: the first token of "target" (text), or "target_id"; None when neither."""
    if "target" in payload and "target_id" in payload:
        raise ImplicitICLError("give 'target' or 'target_id', not both")
    if "target_id" in payload:
        return int_field(payload, "target_id", 0, 0, loaded.model.config.vocab_size - 1)
    target = text_field(payload, "target", required=False, allow_empty=True)
    if not target:
        return None
    if loaded.tokenizer is None:
        raise ImplicitICLError(f"{loaded.name} has no tokenizer; give 'target_id' instead of 'target'")
    return token_ids(loaded.tokenizer, target)[0]


def query_list(loaded: LoadedModel, payload: dict, name: str, most: int) -> list:
    """payload[name]: a non-empty list of queries, each text or a list of ids (at most `most`)."""
    value = payload.get(name)
    if not isinstance(value, list) or not value:
        raise ImplicitICLError(f"{name!r} must be a non-empty list of queries (strings, or lists of token ids)")
    if len(value) > most:
        raise ImplicitICLError(f"{name!r} holds {len(value)} queries, more than {most}; give fewer")
    for index, item in enumerate(value):
        is_ids = isinstance(item, list) and item and all(isinstance(i, int) and not isinstance(i, bool) for i in item)
        if not is_ids and not (isinstance(item, str) and item.strip()):
            raise ImplicitICLError(f"{name!r} item {index} is not a query (a non-empty string or list of ids)")
        if isinstance(item, str) and len(item) > MAX_CHARS:
            raise ImplicitICLError(f"{name!r} item {index} is longer than {MAX_CHARS} characters; shorten it")
        if isinstance(item, str) and loaded.tokenizer is None:
            raise ImplicitICLError(f"{loaded.name} has no tokenizer; give {name!r} as lists of token ids")
    return value


def context_and_queries(loaded: LoadedModel, context: str | list[int], queries: list) -> tuple[Tensor, list[Tensor]]:
    """Ids of a context (text or ids) and of queries after it. Text queries are split off the whole prompt
    (`split_ids`), so every one must leave the context's ids as they are."""
    if isinstance(context, list):
        if any(isinstance(query, str) for query in queries):
            raise ImplicitICLError("a context given as ids takes queries as ids too")
        context_ids, query_ids = context, [torch.tensor(query, dtype=torch.long) for query in queries]
        return _checked_context(context_ids), query_ids
    context_ids, query_ids = None, []
    for query in queries:
        if not isinstance(query, str):
            raise ImplicitICLError("a context given as text takes queries as text too")
        before, alone = split_ids(loaded.tokenizer, context, query)
        if context_ids is not None and before != context_ids:
            raise ImplicitICLError(
                f"the query {query!r} changes how the context is tokenized; end the context with a newline"
            )
        context_ids = before
        query_ids.append(torch.tensor(alone, dtype=torch.long))
    return _checked_context(context_ids), query_ids


def _checked_context(context_ids: list[int]) -> Tensor:
    if not context_ids:
        raise ImplicitICLError("the context is empty, so there is nothing to compile; give demonstrations")
    if len(context_ids) > MAX_CONTEXT_TOKENS:
        raise ImplicitICLError(
            f"the context holds {len(context_ids)} tokens, more than {MAX_CONTEXT_TOKENS}; shorten it"
        )
    return torch.tensor(context_ids, dtype=torch.long)
