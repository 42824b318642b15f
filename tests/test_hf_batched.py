"""compute_patches: many (context, query) pairs through one padded forward pass equal the pair-by-pair loop.

HF's eager attention computes its softmax in float32 even in float64 models, so a padded row (more
masked keys) and an unpadded one round differently at ~1e-7. With the softmax in the model's dtype
(`float64_softmax`), the batched and looped patches agree to float64 precision: the 1e-7 is HF's
arithmetic, not the batching.
"""

import pytest
import torch
from helpers import float64_softmax
from hypothesis import given, settings
from hypothesis import strategies as st

from implicit_icl.errors import ImplicitICLError
from implicit_icl.hf import SPECS, compute_patch, compute_patches, verify_patch
from implicit_icl.models.zoo import VOCAB_SIZE, tiny_model
from implicit_icl.theory import LowRankUpdate

# Gemma 2/3 normalise in float32 even in float64 models (see test_hf_families.py).
FLOAT64_TOLERANCE = {"gemma2": 1e-5, "gemma3_text": 1e-5}


def _dense(delta):
    return delta.dense() if isinstance(delta, LowRankUpdate) else delta


def _pairs(draw_lengths, seed):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(0, VOCAB_SIZE, (n,), generator=generator),
            torch.randint(0, VOCAB_SIZE, (q,), generator=generator),
        )
        for n, q in draw_lengths
    ]


@pytest.mark.parametrize("family", sorted(SPECS))
@pytest.mark.parametrize("padding", ["left", "right"])
@settings(max_examples=3, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 3)), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_batched_patches_equal_the_loop(family, padding, lengths, seed):
    model = tiny_model(family, seed=seed % 3)
    pairs = _pairs(lengths, seed)
    tolerance = FLOAT64_TOLERANCE.get(family, 1e-9)
    with float64_softmax():
        batch = compute_patches(model, pairs, padding=padding)
        assert batch.batched and len(batch) == len(pairs)
        for entry, (context, query) in enumerate(pairs):
            single = compute_patch(model, context, query)
            assert batch[entry].sources == single.sources
            for name, delta in single.deltas.items():
                expected = _dense(delta)
                scale = 1 + expected.abs().max()
                assert (_dense(batch[entry].deltas[name]) - expected).abs().max() <= tolerance * scale, name
            verification = verify_patch(model, context, query, batch[entry])
            assert verification.max_abs_logit_diff <= tolerance and verification.top1_match


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "mixtral"])
def test_batched_patches_in_float32_with_hfs_own_arithmetic(family):
    model = tiny_model(family, seed=0, dtype=torch.float32)
    pairs = _pairs([(12, 1), (30, 2), (3, 3), (21, 1)], seed=5)
    batch = compute_patches(model, pairs, dtype=torch.float32)
    for entry, (context, query) in enumerate(pairs):
        verification = verify_patch(model, context, query, batch[entry])
        assert verification.max_abs_logit_diff <= 1e-4 and max(verification.layer_max_abs_diffs) <= 1e-4
        assert verification.baseline_max_abs_logit_diff > 1e-2  # the context mattered


def test_batched_patch_applies_to_the_batch_of_reduced_inputs():
    """Entry i acts on sequence i of a batch of lone queries (hooks), as each entry does on its own."""
    model = tiny_model("qwen2", seed=1)
    pairs = _pairs([(10, 1), (25, 1), (4, 1)], seed=2)
    batch = compute_patches(model, pairs)
    queries = torch.stack([query for _, query in pairs])
    positions = torch.tensor([[context.numel()] for context, _ in pairs])
    with torch.no_grad(), batch.applied(model):
        together = model(queries, position_ids=positions).logits[:, -1]
    for entry, (context, query) in enumerate(pairs):
        with torch.no_grad():
            expected = model(torch.cat([context, query])[None]).logits[0, -1]
        assert (together[entry] - expected).abs().max() < 1e-6


def test_no_pairs_and_a_bad_padding_side_are_refused():
    model = tiny_model("llama")
    with pytest.raises(ImplicitICLError, match="no \\(context, query\\) pairs"):
        compute_patches(model, [])
    with pytest.raises(ImplicitICLError, match="padding side"):
        compute_patches(model, _pairs([(3, 1)], 0), padding="middle")
