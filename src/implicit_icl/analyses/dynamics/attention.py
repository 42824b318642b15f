"""The copies' attention in two parts: against the cached context, and each one-token copy against itself.

In the one-pass layout (prefixes.py) copy j of a one-token query sees the context's first p_j keys and its
own key, nothing else, so of the [T, S + T] scores HF's eager attention computes, the T × T block of the
copies is diagonal. Here the scores are a [T, S] product against the context and the T diagonal entries, and
one softmax runs over the S + 1 of them: the same function as eager attention (same masks, HF's float32
softmax, optional tanh softcapping), at half the products and softmax entries. It is registered with HF's
attention interface and swapped in for the copies pass only, for families whose eager attention is exactly
this function (`FamilySpec.plain_attention`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel

from implicit_icl.engine.spec import FamilySpec

NAME = "implicit_icl_copies"


def copies_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """query [B, H, T, D] of T one-token copies; key, value [B, H_kv, S + T, D] (the S cached context tokens,
    then the copies); attention_mask [B, 1, T, S + T] additive. Returns [B, T, H, D] as HF's eager does."""
    copies = query.shape[2]
    context = key.shape[2] - copies
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scaling = module.head_dim**-0.5 if scaling is None else scaling
    scores = torch.cat(
        [
            torch.matmul(query, key[:, :, :context].transpose(2, 3)) * scaling,  # [B, H, T, S]
            (query * key[:, :, context:]).sum(-1, keepdim=True) * scaling,  # [B, H, T, 1]: each copy's own key
        ],
        -1,
    )
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    own_mask = attention_mask[..., context:].diagonal(dim1=-2, dim2=-1)[..., None]
    scores = scores + torch.cat([attention_mask[..., :context], own_mask], -1)
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    output = (
        torch.matmul(weights[..., :context], value[:, :, :context]) + weights[..., context:] * value[:, :, context:]
    )
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, copies_attention)


@contextmanager
def split_for_copies(model: PreTrainedModel, spec: FamilySpec, one_token: bool) -> Iterator[None]:
    """The model's attention is `copies_attention` inside (when the family allows it, the model runs HF's
    eager attention and the copies are one token each), its own implementation again on exit."""
    config = model.config
    original = config._attn_implementation
    if not (spec.plain_attention and one_token and original == "eager"):
        yield
        return
    # What HF's attention modules read at every call (set_attn_implementation would re-validate the model).
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = original
