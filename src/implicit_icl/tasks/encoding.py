"""Token ids of a prompt: context, query and answer, split where the project removes the context.

The context's ids are the first tokens of the whole prompt's tokenization (context text + query text) and the
query's ids the rest, which must equal the query text tokenized alone; `encode` checks that the split is a
token boundary. So context_ids + query_ids is exactly how the tokenizer reads the whole prompt, and the query
alone (zero-shot, or a context-free patched pass) is the same ids as the query inside it.

Why not tokenize the context text on its own: byte-level BPE tokenizers such as SmolLM2's split a run of
whitespace before a letter, so "\\n\\nQ" is "\\n", "\\n", "Q" (198, 198, 65) while a context ending in "\\n\\n"
alone would end in the single token "\\n\\n" (1116). Reading the context inside the whole prompt gives every
demonstration, the last included, the same [198, 198] ending. No special tokens are added (SmolLM2 has no BOS).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from implicit_icl.errors import ImplicitICLError
from implicit_icl.tasks.sampling import Prompt


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt's token ids (LongTensors); the model reads context_ids then query_ids and should answer."""

    context_ids: Tensor  # [C]: the demonstrations; C = 0 for zero-shot
    query_ids: Tensor  # [Q]: "Q: {input}\nA:"
    answer_ids: Tensor  # [A]: " " + output; answer_ids[0] is the token first-token accuracy scores

    @property
    def input_ids(self) -> Tensor:
        """context_ids then query_ids: [C + Q]."""
        return torch.cat([self.context_ids, self.query_ids])

    @property
    def answer_token(self) -> int:
        return int(self.answer_ids[0])

    @property
    def generation_budget(self) -> int:
        """New tokens for whole-answer greedy decoding: the answer's own tokens, and one to end it."""
        return len(self.answer_ids) + 1


def token_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def split_ids(tokenizer: PreTrainedTokenizerBase, context: str, query: str) -> tuple[list[int], list[int]]:
    """The ids of context + query tokenized whole, cut where the query's own ids begin: (context ids, query
    ids). ImplicitICLError when the tokenizer merges the two across the boundary."""
    alone = token_ids(tokenizer, query)
    whole = token_ids(tokenizer, context + query)
    split = len(whole) - len(alone)
    if split < 0 or whole[split:] != alone:
        raise ImplicitICLError(
            f"the tokenizer merges the end of the context with the start of the query {query!r}, so the query's "
            "tokens differ with and without the context; end the context with a newline"
        )
    return whole[:split], alone


def encode(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> EncodedPrompt:
    """The prompt's context, query and answer ids under `tokenizer` (see the module docstring for the split)."""
    context, query = split_ids(tokenizer, prompt.context_text, prompt.query_text)
    answer = token_ids(tokenizer, prompt.answer_text)
    return EncodedPrompt(as_ids(context), as_ids(query), as_ids(answer))


def as_ids(ids: list[int]) -> Tensor:
    return torch.tensor(ids, dtype=torch.long)
