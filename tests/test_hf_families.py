"""Exact patches for the families whose block is not Llama's: (1 + w) norms, post-MLP norms, post-LayerNorm.

Gemma (pre-norms with (1 + w) scales, scaled embeddings), Gemma 2 (post-norms on both sublayers,
attention and final-logit softcapping, sliding layers), Gemma 3 text (q/k norms, sliding + full layers
with their own RoPE), OLMo 2 (no pre-norm: the MLP reads the residual, its output is normalised) and BERT
(bidirectional encoder, LayerNorm after the residual sum). Each is checked at the logits (the encoder's
last hidden state) and at every layer's output against HF's own context-ful forward pass.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from implicit_icl.errors import ImplicitICLError
from implicit_icl.hf import compute_patch, every_position_patches, verify_every_position, verify_patch
from implicit_icl.models.zoo import VOCAB_SIZE, tiny_model

FAMILIES = ["gemma", "gemma2", "gemma3_text", "olmo2", "bert"]
POST_NORM = {"gemma2", "gemma3_text", "olmo2"}

# HF computes Gemma's norms in float32 even in a float64 model, and Gemma 2/3 also multiply by (1 + w)
# in float32, so their post-norm output (the only place δ can be added) holds float32 precision: 1e-5
# is that floor after three layers (the float64 model and the same model with float64 norms differ by
# ~1e-6; with float64 norms the patch is float64-exact, see test_gemma_float64_floor_is_hfs_float32_norm).
# OLMo 2 multiplies its scale in the model's dtype, so it stays float64-exact.
FLOAT64_TOLERANCE = {"gemma2": 1e-5, "gemma3_text": 1e-5}


def _tolerance(family: str, dtype: torch.dtype) -> float:
    return FLOAT64_TOLERANCE.get(family, 1e-9) if dtype == torch.float64 else 1e-4


def _outputs(family: str) -> tuple[str, ...]:
    return ("stable", "norm") if family in POST_NORM else ("down", "bias")


def _ids(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (length,), generator=torch.Generator().manual_seed(seed))


def _assert_exact(verification, tolerance: float) -> None:
    assert verification.max_abs_logit_diff <= tolerance, verification
    assert max(verification.layer_max_abs_diffs) <= tolerance, verification
    assert verification.top1_match, verification
    assert verification.baseline_max_abs_logit_diff > 0.1, verification  # the context mattered


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**16), context_length=st.integers(1, 64))
def test_query_alone_reproduces_the_context(family, dtype, seed, context_length):
    model = tiny_model(family, seed=seed % 3, dtype=dtype)
    ids = _ids(context_length + 1, seed)
    patch = compute_patch(model, ids[:-1], ids[-1:], dtype=dtype)
    _assert_exact(verify_patch(model, ids[:-1], ids[-1:], patch), _tolerance(family, dtype))


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**16), data=st.data())
def test_removing_a_span_with_every_output_side(family, seed, data):
    context_length = data.draw(st.integers(2, 40))
    start = data.draw(st.integers(0, context_length - 1))
    end = data.draw(st.integers(start + 1, context_length))
    model = tiny_model(family, seed=seed % 3)
    ids = _ids(context_length + 2, seed)
    context, query = ids[:context_length], ids[context_length:]
    for output in _outputs(family):
        patch = compute_patch(model, context, query, drop=(start, end), output=output)
        assert patch.output == output
        verification = verify_patch(model, context, query, patch)
        tolerance = _tolerance(family, torch.float64) * (100 if output == "norm" else 1)
        assert verification.max_abs_logit_diff <= tolerance, (output, verification)
        assert max(verification.layer_max_abs_diffs) <= tolerance, (output, verification)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_position_from_one_forward_pass(family):
    model = tiny_model(family, seed=2)
    ids = _ids(40, 3)
    patches = every_position_patches(model, ids)
    assert len(patches) == 40
    _assert_exact(verify_every_position(model, ids, patches), _tolerance(family, torch.float64))


@pytest.mark.parametrize("family", sorted(POST_NORM))
def test_post_norm_families_patch_the_norm_scale(family):
    model = tiny_model(family, seed=0)
    ids = _ids(30, 1)
    stable = compute_patch(model, ids[:-1], ids[-1:])
    assert stable.output == "stable"
    kinds = {row["parameter"].split(".", 3)[-1]: row["kind"] for row in stable.summary()}
    assert kinds["mlp.down_proj.weight"] == "rank-1" and kinds["post_feedforward_layernorm.weight"] == "scale shift"
    elementwise = compute_patch(model, ids[:-1], ids[-1:], output="norm")
    assert not any(name.endswith("down_proj.weight") for name in elementwise.deltas)
    with pytest.raises(ImplicitICLError, match="norm"):
        compute_patch(model, ids[:-1], ids[-1:], output="down")


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_gemma_float64_floor_is_hfs_float32_norm(family, monkeypatch):
    """With Gemma's RMSNorm computing in the model's dtype instead of float32, the same patch construction
    is float64-exact: the 1e-5 tolerance above is HF's arithmetic, not an error of the patch."""
    norm_class = type(tiny_model(family).model.norm)
    monkeypatch.setattr(norm_class, "forward", lambda self, x: self._norm(x) * (1.0 + self.weight))
    model = tiny_model(family, seed=1)
    ids = _ids(33, 4)
    for output in ("stable", "norm"):
        patch = compute_patch(model, ids[:-1], ids[-1:], output=output)
        _assert_exact(verify_patch(model, ids[:-1], ids[-1:], patch), 1e-9)


def test_stable_variant_reaches_what_the_elementwise_scale_cannot():
    """A zero row of down_proj zeroes one coordinate of m_C: no scale reaches it, a moved m does."""
    model = tiny_model("olmo2", seed=0)
    ids = _ids(20, 2)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[5] = 0
    with pytest.raises(ImplicitICLError, match="zero at 1 coordinate"):
        compute_patch(model, ids[:-1], ids[-1:], output="norm")
    patch = compute_patch(model, ids[:-1], ids[-1:], output="stable")
    _assert_exact(verify_patch(model, ids[:-1], ids[-1:], patch), 1e-9)


def test_a_zero_mlp_input_is_refused():
    model = tiny_model("gemma", seed=0)
    with torch.no_grad():  # Gemma scales by 1 + w: w = -1 zeroes the MLP input of layer 1
        model.model.layers[1].post_attention_layernorm.weight.fill_(-1)
    with pytest.raises(ImplicitICLError, match="layer 1.*zero vector"):
        compute_patch(model, [3, 4, 5], [6])


def test_bert_patch_is_bias_free_by_default_and_a_steering_vector_on_request():
    model = tiny_model("bert", seed=1)
    ids = _ids(12, 5)
    default = compute_patch(model, ids[:-1], ids[-1:])
    assert {row["kind"] for row in default.summary()} == {"rank-1"}
    assert default.modules == [
        f"encoder.layer.{i}.{m}" for i in range(2) for m in ("intermediate.dense", "output.dense")
    ]
    steering = compute_patch(model, ids[:-1], ids[-1:], output="bias")
    assert "encoder.layer.1.output.dense.bias" in steering.deltas
    _assert_exact(verify_patch(model, ids[:-1], ids[-1:], steering), 1e-9)
