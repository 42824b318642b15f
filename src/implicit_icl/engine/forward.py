"""One forward pass of a Hugging Face model on given inputs: ids, absolute positions and an attention mask.

Three kinds of batches go through `run_model`:
- plain: one or more sequences of equal length, every token visible (an all-ones padding mask);
- padded: sequences of different lengths, left or right padded, with a [B, T] padding mask;
- custom: one layout of tokens per sequence with a [B, T, S + T] boolean visibility matrix over the S
  cached tokens and the T new ones, e.g. copies of a query after a cached context, each copy seeing only a
  prefix of the context (dynamics).
Positions are explicit everywhere, so a token can sit at its original absolute position whatever its index.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from transformers import Cache, PreTrainedModel

from implicit_icl.engine.spec import spec_for
from implicit_icl.errors import ImplicitICLError, holds_values


class StopForward(Exception):
    """Raised by a hook after the last layer: the final norm and the head are not needed."""


@dataclass(frozen=True)
class ForwardInputs:
    """input_ids, position_ids: [B, T]. attention_mask: [B, T] padding mask (1 = token, 0 = padding), or
    [B, T, S + T] boolean visibility (row t may attend to column s; causality is the caller's business):
    the first S columns are the tokens of a cache the run extends, a plain sequence at positions 0..S−1."""

    input_ids: Tensor
    position_ids: Tensor
    attention_mask: Tensor

    @classmethod
    def plain(cls, input_ids: Tensor, position_ids: Tensor | None = None) -> ForwardInputs:
        """Sequences [B, T] with every token visible, at positions 0..T−1 unless given."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return cls(input_ids, position_ids, torch.ones_like(input_ids))

    @classmethod
    def padded(
        cls, sequences: Sequence[Tensor], positions: Sequence[Tensor] | None = None, side: str = "left"
    ) -> ForwardInputs:
        """Sequences [T_b] padded to one length on `side`; positions [T_b] per sequence (default 0..T_b−1).
        Padding gets id 0 and position 0 and is masked out."""
        if side not in ("left", "right"):
            raise ImplicitICLError(f"padding side must be 'left' or 'right', not {side!r}")
        length = max(sequence.numel() for sequence in sequences)
        device = sequences[0].device
        ids = torch.zeros(len(sequences), length, dtype=torch.long, device=device)
        position_ids, mask = torch.zeros_like(ids), torch.zeros_like(ids)
        for row, sequence in enumerate(sequences):
            n = sequence.numel()
            span = slice(length - n, length) if side == "left" else slice(0, n)
            ids[row, span] = sequence
            position_ids[row, span] = torch.arange(n, device=device) if positions is None else positions[row]
            mask[row, span] = 1
        return cls(ids, position_ids, mask)

    @property
    def custom(self) -> bool:
        return self.attention_mask.dim() == 3

    def to(self, device: torch.device) -> ForwardInputs:
        return ForwardInputs(self.input_ids.to(device), self.position_ids.to(device), self.attention_mask.to(device))


def run_model(
    model: PreTrainedModel, inputs: ForwardInputs, cache: Cache | None = None, logits_to_keep: int | Tensor = 0
) -> Tensor | None:
    """The model's output (logits, or the last hidden state of an encoder) [B, T, ·]; None when a hook
    stopped the run after the last layer. logits_to_keep: HF's, the head on the last k or the given positions.

    The padding mask is always passed (all ones when nothing is padded): without it HF reads a jump in
    position_ids (a removed span) as the start of another packed sequence and hides the tokens before it.
    cache: the keys and values of earlier tokens of plain sequences, which `inputs` continue (custom inputs
    see the cached tokens their mask shows); the run appends its own (also when a hook stops it, since every
    layer's attention has run by then)."""
    if cache is None or inputs.custom:
        mask = model_attention_mask(model, inputs)
    else:
        mask = torch.ones_like(inputs.input_ids).expand(-1, cache.get_seq_length() + inputs.input_ids.shape[1])
    extra = {} if cache is None else {_cache_argument(model): cache}
    if isinstance(logits_to_keep, Tensor) or logits_to_keep:  # encoders take no such argument
        extra["logits_to_keep"] = logits_to_keep
    try:
        output = model(
            input_ids=inputs.input_ids,
            position_ids=inputs.position_ids,
            attention_mask=mask,
            use_cache=cache is not None,
            **extra,
        )
    except StopForward:
        return None
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


def _cache_argument(model: PreTrainedModel) -> str:
    """The name the model's forward takes its cache by: `cache` since transformers 5.25, `past_key_values`
    before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def model_attention_mask(model: PreTrainedModel, inputs: ForwardInputs) -> Tensor | dict[str, Tensor]:
    """The attention mask `run_model` passes to HF for these inputs (see `custom_attention_mask`)."""
    if inputs.custom:
        return custom_attention_mask(model, inputs)
    mask = inputs.attention_mask
    if spec_for(model).encoder or not holds_values(mask) or bool(mask[:, 0].all()):
        return mask
    # Left padding in a decoder: a padding token at the start sees no token at all. HF fills masked scores
    # with the dtype's minimum, which the float32 softmax of a float64 model turns into −inf: a row of NaN
    # that leaks into the real tokens (0 · NaN). Letting padding see itself keeps every row finite.
    length = mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    itself = torch.eye(length, dtype=torch.bool, device=mask.device)
    return custom_attention_mask(model, replace(inputs, attention_mask=causal & mask[:, None, :].bool() | itself))


def custom_attention_mask(model: PreTrainedModel, inputs: ForwardInputs) -> Tensor | dict[str, Tensor]:
    """The additive 4-D mask [B, 1, T, S + T] HF's eager attention takes as it is, from a visibility matrix
    (S > 0: over a cache of the positions 0..S−1 first).

    HF builds sliding-window masks itself only for masks it creates; a custom mask must carry the window:
    a key at position p_k is visible from p_q only if p_q − p_k < window (HF's rule), measured on the
    position ids. Families with per-layer attention types (Gemma 2/3, Qwen 2/3) take a dict of masks."""
    config = model.config
    if getattr(config, "alibi", False):
        raise ImplicitICLError("ALiBi models build their position bias from a padding mask; custom masks do not apply")
    if spec_for(model).encoder:
        raise ImplicitICLError(f"{config.model_type} is an encoder; custom masks apply to causal decoders only")
    visible = inputs.attention_mask.bool()
    window = getattr(config, "sliding_window", None)
    dtype = next(model.parameters()).dtype

    def additive(allowed: Tensor) -> Tensor:
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]

    def windowed() -> Tensor:
        queries = inputs.position_ids
        cached = torch.arange(visible.shape[-1] - queries.shape[1], device=queries.device)
        keys = torch.cat([cached.expand(queries.shape[0], -1), queries], 1)
        return visible & (queries[:, :, None] - keys[:, None, :] < window)  # distances [B, T_query, S + T]

    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return additive(windowed() if window else visible)
    masks = {"full_attention": additive(visible)}
    if window:
        masks["sliding_attention"] = additive(windowed())
    unknown = set(layer_types) - set(masks)
    if unknown:
        raise ImplicitICLError(f"custom masks do not cover attention types {sorted(unknown)} of this model")
    return masks


def model_device(model: nn.Module) -> torch.device:
    """Where inputs go: the device of the input embeddings (a dispatched model spreads its layers)."""
    return model.get_input_embeddings().weight.device
