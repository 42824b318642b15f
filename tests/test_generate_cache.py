"""Cached patched generation (engine/growing.py) against the uncached reference and HF's own forward pass."""

import pytest
import torch

from implicit_icl.engine.forward import ForwardInputs, run_model
from implicit_icl.engine.growing import GrowingContext, one_token, prefilled_cache
from implicit_icl.engine.spec import layers_of, spec_for
from implicit_icl.hf import SPECS, compute_patch, patched_generate
from implicit_icl.models.zoo import ENCODER_FAMILIES, VOCAB_SIZE, ZOO_CASES, tiny_model

DECODER_CASES = [
    (family, variant) for family, variant in ZOO_CASES if family in SPECS and family not in ENCODER_FAMILIES
]
POST_NORM_GEMMAS = {"gemma2", "gemma3_text"}  # HF's Gemma RMSNorm computes in float32 even in float64


def _ids(seed: int, n: int) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted({family for family, _ in DECODER_CASES}))
def test_the_prefilled_cache_is_hfs_and_the_last_attention_is_not_run(family):
    """The run that fills the cache stops once the last layer has stored its keys and values: the cache is
    the one HF's own cached forward leaves, bit for bit, and the last layer's attention never returns."""
    model = tiny_model(family, seed=5)
    ids = _ids(5, 20)
    cache = prefilled_cache(model, ids)
    reference = model(input_ids=ids[None], use_cache=True).past_key_values
    for ours, theirs in zip(cache.layers, reference.layers, strict=True):
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
    spec = spec_for(model)
    last = layers_of(model, spec)[-1]
    returned = []
    handle = (last if spec.attention is None else last.get_submodule(spec.attention)).register_forward_hook(
        lambda *args: returned.append(True)
    )
    try:
        prefilled_cache(model, ids)
    finally:
        handle.remove()
    assert not returned


@pytest.mark.parametrize(("family", "variant"), DECODER_CASES)
def test_cached_and_uncached_generation_pick_the_same_tokens(family, variant):
    """50 context tokens + 3 query + 12 new: past every sliding window of the zoo (at most 48)."""
    model = tiny_model(family, variant=variant, seed=3)
    ids = _ids(3, 53)
    cached = patched_generate(model, ids[:50], ids[50:], 12, dtype=torch.float64)
    uncached = patched_generate(model, ids[:50], ids[50:], 12, dtype=torch.float64, cache=False)
    assert cached.tokens_with_context == uncached.tokens_with_context
    assert cached.tokens_patched == uncached.tokens_patched
    assert cached.agreement == cached.teacher_forced_agreement == 1.0


@pytest.mark.parametrize("family", sorted({family for family, _ in DECODER_CASES}))
def test_each_step_reproduces_the_context_and_its_patch_is_compute_patchs(family):
    """Per token: the step's logits and the step's patch re-applied through hooks both equal HF's context-ful
    forward pass; every layer's delta equals compute_patch's for the same (prefix, token)."""
    model = tiny_model(family, seed=4)
    ids = _ids(4, 24)
    growing = GrowingContext(model, ids[:18], None, torch.float64)
    tolerance = 1e-6 if family in POST_NORM_GEMMAS else 1e-9
    for i in range(18, 24):
        step = growing.step(int(ids[i]), head=True)
        reference = run_model(model, ForwardInputs.plain(ids[None, : i + 1]))[0, -1]
        with step.patch.applied(model, via="hooks"):
            reapplied = run_model(model, one_token(int(ids[i]), i, ids.device))[0, -1]
        for logits in (step.patched_logits, reapplied):
            assert (logits - reference).abs().max() < tolerance * reference.abs().max()
        assert torch.allclose(step.context_logits, reference, rtol=0, atol=1e-12)
    expected = compute_patch(model, ids[:23], ids[23:], dtype=torch.float64)
    for name, delta in step.patch.deltas.items():
        other = expected.deltas[name]
        dense, other_dense = (d.dense() if hasattr(d, "dense") else d for d in (delta, other))
        assert (dense - other_dense).norm() <= tolerance * other_dense.norm() + 1e-12, name


def test_the_patch_in_the_weights_generates_the_same_tokens():
    model = tiny_model("llama", seed=6)
    ids = _ids(6, 20)
    hooks = patched_generate(model, ids[:-2], ids[-2:], 8, dtype=torch.float64)
    weights = patched_generate(model, ids[:-2], ids[-2:], 8, dtype=torch.float64, via="weights")
    assert weights.tokens_patched == hooks.tokens_patched == hooks.tokens_with_context
    assert weights.seconds_per_token_patched > 0
