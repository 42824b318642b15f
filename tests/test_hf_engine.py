"""The flagship property, per family: the patched model without the context reproduces the model with it.

The families with a Llama-like pre-norm block (sequential or parallel, gated or not, Conv1D or Linear,
dense or mixture of experts) are tested here on their tiny random zoo models (GQA, odd widths, tied and
untied embeddings), at the logits and at every layer's output, with the unpatched difference as a guard
that the context mattered and the patched path really ran. Families with (1 + w) or post-MLP norms and
the post-LayerNorm encoder have theirs in test_hf_families.py.
"""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from implicit_icl.engine.capture import attended_to_itself, first_output, hooked
from implicit_icl.engine.spec import layers_of
from implicit_icl.hf import SPECS, compute_patch, every_position_patches, verify_every_position, verify_patch
from implicit_icl.models.zoo import VOCAB_SIZE, ZOO_CASES, tiny_model

# Every family with a spec, except those with (1 + w) or post-MLP norms and the post-LayerNorm encoder, whose
# tests are in test_hf_families.py: a new spec joins these tests by itself.
FAMILIES = set(SPECS) - {"gemma", "gemma2", "gemma3_text", "olmo2", "bert"}
CASES = [(family, variant) for family, variant in ZOO_CASES if family in FAMILIES]
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


def _ids(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (length,), generator=torch.Generator().manual_seed(seed))


def _assert_exact(verification, dtype):
    tolerance = TOLERANCE[dtype]
    assert verification.max_abs_logit_diff <= tolerance, verification
    assert max(verification.layer_max_abs_diffs) <= tolerance, verification
    assert verification.top1_match
    # The guard: without the patch the context visibly matters, so a patch that does nothing would fail.
    assert verification.baseline_max_abs_logit_diff > 1e-3, verification


@pytest.mark.parametrize(("family", "variant"), CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), context_length=st.integers(1, 64))
def test_query_alone_reproduces_the_context(family, variant, dtype, seed, context_length):
    ids = _ids(context_length + 1, seed)
    # A context that only repeats the query token changes nothing under relative positions (attention
    # averages equal values) beyond the softmax's float32 rounding, so the guard cannot hold (Mixtral, seed 4945).
    assume(not (ids[:-1] == ids[-1]).all())
    model = tiny_model(family, variant=variant, seed=seed % 3, dtype=dtype)
    patch = compute_patch(model, ids[:-1], ids[-1:], dtype=dtype)
    assert patch.dtype == dtype and patch.positions == (context_length,)
    _assert_exact(verify_patch(model, ids[:-1], ids[-1:], patch), dtype)


@pytest.mark.parametrize(("family", "variant"), CASES)
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**16), data=st.data())
def test_removing_a_span_is_a_true_weight_patch(family, variant, seed, data):
    context_length = data.draw(st.integers(2, 40))
    start = data.draw(st.integers(0, context_length - 1))
    end = data.draw(st.integers(start + 1, context_length))
    query_length = data.draw(st.integers(1, 3))
    model = tiny_model(family, variant=variant, seed=seed % 3)
    ids = _ids(context_length + query_length, seed)
    context, query = ids[:context_length], ids[context_length:]
    for output in SPECS[family].output_sides:
        patch = compute_patch(model, context, query, drop=(start, end), output=output)
        verification = verify_patch(model, context, query, patch)
        assert verification.max_abs_logit_diff <= 1e-9 and max(verification.layer_max_abs_diffs) <= 1e-9


@pytest.mark.parametrize(("family", "variant"), CASES)
def test_a_multi_token_query_alone(family, variant):
    model = tiny_model(family, variant=variant, seed=1)
    ids = _ids(24, 7)
    patch = compute_patch(model, ids[:20], ids[20:], output=SPECS[family].output_sides[-1])
    _assert_exact(verify_patch(model, ids[:20], ids[20:], patch), torch.float64)


@pytest.mark.parametrize(("family", "variant"), CASES)
def test_every_position_from_one_forward_pass(family, variant):
    model = tiny_model(family, variant=variant, seed=2)
    ids = _ids(48, 3)
    patches = every_position_patches(model, ids)
    assert len(patches) == 48 and patches.batched
    _assert_exact(verify_every_position(model, ids, patches), torch.float64)
    # Entry i is the query-alone patch of token i after tokens 0..i-1: the same deltas.
    single = compute_patch(model, ids[:30], ids[30:31])
    for name, delta in single.deltas.items():
        expected = delta.dense() if hasattr(delta, "dense") else delta
        actual = patches[30].deltas[name]
        torch.testing.assert_close(actual.dense() if hasattr(actual, "dense") else actual, expected)


def test_patched_weights_reproduce_the_context_through_hf_forward():
    """Independent of our hooks: plain HF calls, the patch added to the weights."""
    model = tiny_model("llama", seed=4)
    ids = _ids(33, 4)
    patch = compute_patch(model, ids[:-1], ids[-1:])
    with torch.no_grad():
        expected = model(ids[None]).logits[0, -1]
        with patch.applied(model, via="weights"):
            patched = model(ids[-1:][None], position_ids=torch.tensor([[32]])).logits[0, -1]
        unpatched = model(ids[-1:][None], position_ids=torch.tensor([[32]])).logits[0, -1]
    assert (patched - expected).abs().max() < 1e-10
    assert (unpatched - expected).abs().max() > 1e-2


def test_bfloat16_model_with_float32_arithmetic():
    model = tiny_model("llama", seed=0, dtype=torch.bfloat16)
    ids = _ids(20, 0)
    patch = compute_patch(model, ids[:-1], ids[-1:], dtype=torch.float32)
    verification = verify_patch(model, ids[:-1], ids[-1:], patch)
    assert patch.dtype == torch.float32
    # bfloat16 rounds at about 1e-2 relative; the context moves the logits by far more.
    assert verification.max_abs_logit_diff < 0.1 * verification.baseline_max_abs_logit_diff


def test_one_token_reduced_pass_recomputes_only_what_the_patch_needs(monkeypatch):
    """Per layer the context-ful pass runs all 7 matrices; the reduced pass then runs only o_proj (the
    attention output of the token alone, from its values) and gate/up (u = W (z_C − z) needs W z): the
    attention and down_proj are replayed from the context-ful pass."""
    model = tiny_model("llama", seed=0)
    called = []
    linear_forward = torch.nn.Linear.forward
    names = {module: name.rsplit(".", 1)[-1] for name, module in model.model.layers[0].named_modules()}

    def counting_forward(module, x):
        called.append(names.get(module))
        return linear_forward(module, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", counting_forward)
    every_position_patches(model, _ids(10, 0))
    assert sorted(name for name in called if name) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "o_proj", "gate_proj", "up_proj"]
    )


SELF_ATTENDING = [(family, variant) for family, variant in ZOO_CASES if SPECS[family].attends_to_itself]


@pytest.mark.parametrize(("family", "variant"), SELF_ATTENDING)
def test_a_plain_attention_on_tokens_alone_is_its_values_through_the_output_projection(family, variant):
    """What the one-token reduced pass replays instead of running the attention (`attended_to_itself`):
    HF's own attention modules on one-token sequences, at every layer (grouped heads, fused qkv, biases)."""
    model = tiny_model(family, seed=0, variant=variant)
    spec = SPECS[family]
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen[name] = first_output(output)

        return hook

    layers = layers_of(model, spec)
    handles = [
        hook_module.register_forward_hook(record((index, path)))
        for index, layer in enumerate(layers)
        for path in (spec.attention, spec.attention_inputs[-1])
        for hook_module in [layer.get_submodule(path)]
    ]
    with hooked(handles):
        model(input_ids=_ids(7, 1)[:, None], position_ids=torch.arange(3, 10)[:, None])
    for index, layer in enumerate(layers):
        attention = layer.get_submodule(spec.attention)
        replayed, weights = attended_to_itself(
            attention, layer.get_submodule(spec.attention_output), seen[index, spec.attention_inputs[-1]][:, 0]
        )
        assert weights is None and replayed.shape == seen[index, spec.attention].shape
        assert (replayed - seen[index, spec.attention]).abs().max() <= 1e-13


def test_top_level_api_loads_the_engine_lazily():
    import implicit_icl

    assert implicit_icl.compute_patch is compute_patch and implicit_icl.Patch.__name__ == "Patch"
    with pytest.raises(AttributeError, match="no attribute 'compute'"):
        implicit_icl.compute  # noqa: B018


def test_mixture_of_experts_on_an_offloaded_layer(tmp_path):
    """Router and experts weights of a disk-offloaded layer sit on the meta device outside its forward:
    the construction reads them while the block runs, and the patch acts through hooks."""
    from accelerate import dispatch_model

    model = tiny_model("mixtral", seed=0)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu"}
    device_map |= {"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = dispatch_model(model, device_map=device_map, offload_dir=tmp_path, main_device="cpu")
    assert model.model.layers[0].mlp.experts.gate_up_proj.device.type == "meta"
    ids = _ids(20, 0)
    for drop in (None, (2, 6)):  # the query alone, and a removed span (other tokens see the patch too)
        patch = compute_patch(model, ids[:-1], ids[-1:], drop=drop)
        _assert_exact(verify_patch(model, ids[:-1], ids[-1:], patch), torch.float64)
