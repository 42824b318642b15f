"""Forward passes over encoded prompts: next-token logits and greedy answers, batched with left padding.

Prompts are padded on the left (`ForwardInputs.padded`), so every prompt's last token sits in the last column,
with positions that start at 0 on each prompt's first real token (or the positions given) and the padding
masked out. Two ways to decode greedily:
- `greedy_continuations` re-reads each growing sequence at every step through `run_model`, which lets padding
  see itself, so a float64 model's float32 softmax gives no NaN; any next-token rule can drive it (the exact
  patch's decoding in `implicit_icl.studies.evaluate.scores` does);
- `decode_greedily`, the model's own greedy answers: float32 and bfloat16 models read each prompt once and then
  one token per step through HF's cache, only the last position going through the head; float64 models take
  the first way (HF's own padding mask would give their padding rows NaN).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from implicit_icl.engine.forward import ForwardInputs, model_device, run_model
from implicit_icl.tasks.encoding import encode
from implicit_icl.tasks.sampling import Prompt
from implicit_icl.tasks.scoring import whole_answer_correct
from implicit_icl.tasks.template import SEPARATOR

NextTokens = Callable[[list[Tensor]], Tensor]  # B sequences [L_b] -> the next token of each, [B]


@torch.no_grad()
def next_token_logits(
    model: PreTrainedModel, sequences: Sequence[Tensor], positions: Sequence[Tensor] | None = None
) -> Tensor:
    """Logits for the token after each sequence: [B, V] on the CPU, in the model's dtype.

    sequences: B LongTensors [L_b], L_b ≥ 1; positions: B LongTensors [L_b] (default 0 .. L_b − 1)."""
    inputs = ForwardInputs.padded(list(sequences), positions, side="left").to(model_device(model))
    return run_model(model, inputs)[:, -1].cpu()


def plain_next_tokens(model: PreTrainedModel) -> NextTokens:
    """The model's own greedy choice after each sequence."""
    return lambda sequences: next_token_logits(model, sequences).argmax(-1)


def answer_ends(tokenizer: PreTrainedTokenizerBase) -> Callable[[int], bool]:
    """Whether a token ends an answer: the end token, or any token holding the separator (a newline)."""
    return lambda token: token == tokenizer.eos_token_id or SEPARATOR in tokenizer.decode([token])


def greedy_continuations(
    next_tokens: NextTokens,
    sequences: Sequence[Tensor],
    budgets: Sequence[int],
    ends: Callable[[int], bool],
    first_tokens: Sequence[int] | None = None,
) -> list[list[int]]:
    """Up to budgets[b] greedy tokens after each sequence b, each list ending at its first token that `ends`.

    next_tokens is asked only about the sequences still running, each extended by what it generated so far.
    first_tokens: the first new token of each sequence when it is known already (no call for step one)."""
    generated: list[list[int]] = [[] for _ in sequences]
    current = list(sequences)
    running = [row for row, budget in enumerate(budgets) if budget > 0]
    step = 0
    while running:
        if step == 0 and first_tokens is not None:
            tokens = [first_tokens[row] for row in running]
        else:
            tokens = next_tokens([current[row] for row in running]).tolist()
        still_running = []
        for row, token in zip(running, tokens, strict=True):
            generated[row].append(token)
            current[row] = torch.cat([current[row], torch.tensor([token], dtype=current[row].dtype)])
            if not ends(token) and len(generated[row]) < budgets[row]:
                still_running.append(row)
        running, step = still_running, step + 1
    return generated


@torch.no_grad()
def decode_greedily(
    model: PreTrainedModel, sequences: Sequence[Tensor], budgets: Sequence[int], ends: Callable[[int], bool]
) -> tuple[Tensor, list[list[int]]]:
    """The logits after each sequence [B, V] (CPU, model dtype) and up to budgets[b] ≥ 1 greedy tokens after
    sequence b, each list ending at its first token that `ends` (module docstring: cached unless float64)."""
    if model.dtype == torch.float64:
        logits = next_token_logits(model, sequences)
        first = logits.argmax(-1).tolist()
        return logits, greedy_continuations(plain_next_tokens(model), sequences, budgets, ends, first_tokens=first)
    inputs = ForwardInputs.padded(list(sequences), side="left").to(model_device(model))
    ids, mask, positions = inputs.input_ids, inputs.attention_mask, inputs.position_ids
    generated: list[list[int]] = [[] for _ in sequences]
    running = [True] * len(sequences)
    cache, first_logits = None, None
    while any(running):
        output = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
        )
        logits, cache = output.logits[:, -1], output.cache
        first_logits = logits.cpu() if first_logits is None else first_logits
        tokens = logits.argmax(-1)
        for row, token in enumerate(tokens.tolist()):
            if running[row]:
                generated[row].append(token)
                running[row] = not ends(token) and len(generated[row]) < budgets[row]
        ids, positions = tokens[:, None], positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
    return first_logits, generated


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
        budgets = [e.generation_budget if decode else 1 for e in chunk]
        _, generated = decode_greedily(model, inputs, budgets, answer_ends(tokenizer))
        first += [tokens[0] == e.answer_token for tokens, e in zip(generated, chunk, strict=True)]
        texts += [tokenizer.decode(tokens, skip_special_tokens=True) if decode else "" for tokens in generated]
    whole = [decode and whole_answer_correct(text, p.query.output) for text, p in zip(texts, prompts, strict=True)]
    return Answers(torch.tensor(first, dtype=torch.bool), torch.tensor(whole, dtype=torch.bool), texts)
