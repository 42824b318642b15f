"""Plain Hugging Face forward passes over encoded prompts: first-token and whole-answer accuracy.

Prompts are batched with left padding, so every prompt's last real token sits in the last column, with an
attention mask and position ids that start at 0 on each prompt's first real token: a padded prompt gives the
logits it gives alone (up to float rounding). Greedy decoding reads the batch once, then one new token per step
through the model's cache.

Float64 models read sequences of different lengths one at a time: Hugging Face's eager attention takes its
softmax in float32, where float64's mask minimum becomes -inf, so a padding row (which sees no key) turns
into NaN, and the NaN reaches the real tokens through their zero attention weights on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from implicit_icl.tasks.encoding import encode
from implicit_icl.tasks.sampling import Prompt
from implicit_icl.tasks.scoring import whole_answer_correct
from implicit_icl.tasks.template import SEPARATOR


@dataclass(frozen=True)
class LeftPadded:
    """B sequences of lengths L_b, padded on the left to T = max L_b."""

    input_ids: Tensor  # [B, T] long
    attention_mask: Tensor  # [B, T] long: 0 on padding
    position_ids: Tensor  # [B, T] long: 0 .. L_b - 1 on each sequence's own tokens, 0 on padding


def left_padded(sequences: Sequence[Tensor], pad_id: int = 0) -> LeftPadded:
    """sequences: B LongTensors [L_b], each L_b ≥ 1."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, sequence in enumerate(sequences):
        input_ids[row, length - len(sequence) :] = sequence
        attention_mask[row, length - len(sequence) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return LeftPadded(input_ids, attention_mask, position_ids)


def needs_one_at_a_time(model: PreTrainedModel, sequences: Sequence[Tensor]) -> bool:
    """Whether padding these sequences together would give NaN (see the module docstring)."""
    return model.dtype == torch.float64 and len({len(s) for s in sequences}) > 1


@torch.no_grad()
def next_token_logits(model: PreTrainedModel, sequences: Sequence[Tensor], pad_id: int = 0) -> Tensor:
    """Logits for the token after each sequence: [B, V], in the model's dtype."""
    if needs_one_at_a_time(model, sequences):
        return torch.cat([next_token_logits(model, [s], pad_id) for s in sequences])
    batch = left_padded(sequences, pad_id)
    return model(**model_inputs(model, batch), use_cache=False).logits[:, -1].cpu()


def model_inputs(model: PreTrainedModel, batch: LeftPadded) -> dict[str, Tensor]:
    return {
        "input_ids": batch.input_ids.to(model.device),
        "attention_mask": batch.attention_mask.to(model.device),
        "position_ids": batch.position_ids.to(model.device),
    }


@dataclass(frozen=True)
class Answers:
    """What the model answered to N prompts."""

    first_token_correct: Tensor  # [N] bool: argmax next token == answer_ids[0]
    whole_answer_correct: Tensor  # [N] bool: greedy text up to the newline == output (all False if not decoded)
    generated_text: list[str]  # [N] decoded greedy continuations ("" if not decoded)


def answer_prompts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    with_context: bool = True,
    decode: bool = True,
    batch_size: int = 16,
) -> Answers:
    """Score N prompts: first-token accuracy, and whole-answer accuracy by greedy decoding (unless decode=False).

    with_context=False asks each query alone, as if its demonstrations had been removed.
    """
    encoded = [encode(tokenizer, prompt) for prompt in prompts]
    first: list[bool] = []
    texts: list[str] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        inputs = [e.input_ids if with_context else e.query_ids for e in chunk]
        steps = max(e.generation_budget for e in chunk) if decode else 1
        generated = greedy_tokens(model, tokenizer, inputs, steps)
        first += [tokens[0] == e.answer_token for tokens, e in zip(generated, chunk, strict=True)]
        texts += [tokenizer.decode(tokens, skip_special_tokens=True) if decode else "" for tokens in generated]
    whole = [decode and whole_answer_correct(text, p.query.output) for text, p in zip(texts, prompts, strict=True)]
    return Answers(torch.tensor(first, dtype=torch.bool), torch.tensor(whole, dtype=torch.bool), texts)


@torch.no_grad()
def greedy_tokens(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sequences: Sequence[Tensor], steps: int
) -> list[list[int]]:
    """Up to `steps` greedy tokens after each sequence, each list ending at its first newline or end token.

    The first step reads the left-padded batch; each later step feeds only the new tokens through the cache,
    one position further on and with the mask grown by a column of ones.
    """
    if needs_one_at_a_time(model, sequences):
        return [greedy_tokens(model, tokenizer, [s], steps)[0] for s in sequences]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    inputs = model_inputs(model, left_padded(sequences, pad_id))
    generated: list[list[int]] = [[] for _ in sequences]
    finished = [False] * len(sequences)
    cache = None
    for _ in range(steps):
        out = model(**inputs, cache=cache, use_cache=True)
        cache, tokens = out.cache, out.logits[:, -1].argmax(-1)
        for row, token in enumerate(tokens.tolist()):
            if not finished[row]:
                generated[row].append(token)
                finished[row] = token == tokenizer.eos_token_id or SEPARATOR in tokenizer.decode([token])
        if all(finished):
            break
        mask = inputs["attention_mask"]
        inputs = {
            "input_ids": tokens[:, None],
            "attention_mask": torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1),
            "position_ids": inputs["position_ids"][:, -1:] + 1,
        }
    return generated
