"""The copies' two-part attention (analyses/dynamics/attention.py) is HF's eager attention on the one-pass layout:
against HF's own eager function on any shapes, and swapped in for exactly the families whose spec allows it."""

from dataclasses import replace

import pytest
import torch
from helpers import float64_softmax
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import AttentionInterface
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

from implicit_icl.analyses.dynamics import attention
from implicit_icl.analyses.dynamics.attention import copies_attention
from implicit_icl.analyses.dynamics.prefixes import prefix_logits, prefix_patches
from implicit_icl.hf import SPECS
from implicit_icl.models.zoo import VOCAB_SIZE, tiny_model

SPLIT = sorted(family for family, spec in SPECS.items() if spec.plain_attention)


class _Heads(nn.Module):
    def __init__(self, groups: int, head_dim: int) -> None:
        super().__init__()
        self.num_key_value_groups, self.head_dim = groups, head_dim


@settings(max_examples=40, deadline=None)
@given(
    kv_heads=st.integers(1, 3),
    groups=st.integers(1, 3),
    copies=st.integers(1, 9),
    context=st.integers(0, 12),
    window=st.one_of(st.none(), st.integers(1, 6)),
    softcap=st.one_of(st.none(), st.floats(0.5, 30.0)),
    seed=st.integers(0, 10_000),
)
def test_the_split_equals_hfs_eager_attention_on_the_copies_layout(
    kv_heads, groups, copies, context, window, softcap, seed
):
    generator = torch.Generator().manual_seed(seed)
    head_dim = 8
    query = torch.randn(1, kv_heads * groups, copies, head_dim, generator=generator, dtype=torch.float64)
    key, value = (
        torch.randn(1, kv_heads, context + copies, head_dim, generator=generator, dtype=torch.float64) for _ in "kv"
    )
    # copy j sits at position p_j and sees the context's first p_j tokens (within the window) and itself
    starts = torch.randint(0, context + 1, (copies,), generator=generator)
    sees = torch.arange(context)[None] < starts[:, None]
    if window is not None:
        sees &= starts[:, None] - torch.arange(context)[None] < window
    visible = torch.cat([sees, torch.eye(copies, dtype=torch.bool)], 1)
    mask = torch.zeros(1, 1, copies, context + copies, dtype=torch.float64).masked_fill(~visible, -1e300)
    module = _Heads(groups, head_dim).eval()
    with float64_softmax():
        expected, _ = eager_attention_forward(module, query, key, value, mask, scaling=0.3, softcap=softcap)
        got, weights = copies_attention(module, query, key, value, mask, scaling=0.3, softcap=softcap)
    assert weights is None and got.shape == expected.shape == (1, copies, kv_heads * groups, head_dim)
    assert (got - expected).abs().max() <= 1e-12


@pytest.mark.parametrize("family", SPLIT)
def test_one_token_copies_run_the_split_in_every_layer_and_nothing_else_changes(family, monkeypatch):
    model, spec = tiny_model(family, seed=5), SPECS[family]
    generator = torch.Generator().manual_seed(7)
    context, query = torch.randint(0, VOCAB_SIZE, (11,), generator=generator), torch.tensor([3])
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0])
        return copies_attention(*args, **kwargs)

    AttentionInterface.register("counted_copies", counted)
    monkeypatch.setattr(attention, "NAME", "counted_copies")
    with float64_softmax():
        split = prefix_patches(model, context, query)
        assert len(calls) == model.config.num_hidden_layers  # the copies pass only, once per layer
        assert model.config._attn_implementation == "eager"
        calls.clear()
        logits = prefix_logits(model, context, [(11, query), (0, query), (4, query)])
        assert len(calls) == model.config.num_hidden_layers
        calls.clear()
        prefix_patches(model, context, torch.tensor([3, 4]))  # copies of two tokens: HF's eager attention
        assert not calls
        monkeypatch.setitem(SPECS, family, replace(spec, plain_attention=False))
        eager = prefix_patches(model, context, query)
        assert not calls
    assert (split.context_logits - eager.context_logits).abs().max() <= 1e-12
    assert (split.patched_logits - eager.patched_logits).abs().max() <= 1e-12
    assert (logits - eager.context_logits[[11, 0, 4]]).abs().max() <= 1e-12
    with pytest.raises(RuntimeError), attention.split_for_copies(model, spec, one_token=True):
        assert model.config._attn_implementation == "counted_copies"
        raise RuntimeError
    assert model.config._attn_implementation == "eager"
