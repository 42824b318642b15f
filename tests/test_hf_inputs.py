"""Bad input to the HF engine: one ImplicitICLError with a message that says what to do."""

import pytest
import torch

from implicit_icl.errors import ImplicitICLError
from implicit_icl.hf import compute_patch, every_position_patches, patched_generate, verify_patch
from implicit_icl.models.zoo import MAX_POSITIONS, tiny_model

MODEL = tiny_model("llama", seed=0)
IDS = torch.arange(20)


@pytest.mark.parametrize(
    ("context", "query", "kwargs", "message"),
    [
        (IDS[:0], IDS[:1], {}, "the context is empty"),
        (IDS, IDS[:0], {}, "the query is empty"),
        (torch.zeros(MAX_POSITIONS, dtype=torch.long), IDS[:1], {}, f"at most {MAX_POSITIONS} positions"),
        (IDS, torch.tensor([97]), {}, r"token id 97 outside the model's vocabulary \[0, 97\)"),
        (torch.tensor([-1, 3]), IDS[:1], {}, "token id -1 outside"),
        (IDS.float(), IDS[:1], {}, "integer token ids"),
        (IDS, IDS[:1], dict(drop=(5, 30)), "--drop 5:30 is not a non-empty span inside the context of 20 tokens"),
        (IDS, IDS[:1], dict(drop=(4, 4)), "--drop 4:4"),
        (IDS, IDS[:1], dict(output="steer"), "unknown output side 'steer'"),
        (IDS, IDS[:1], dict(output="norm"), "no norm after its MLP"),
        (IDS, IDS[:1], dict(dtype=torch.bfloat16), "float32 or float64"),
    ],
)
def test_bad_input_is_refused(context, query, kwargs, message):
    with pytest.raises(ImplicitICLError, match=message):
        compute_patch(MODEL, context, query, **kwargs)


def test_unknown_family_names_the_supported_ones(unsupported_model):
    with pytest.raises(ImplicitICLError, match=r"unsupported model family 'opt'; supported: .*llama.*FamilySpec"):
        compute_patch(unsupported_model, IDS, IDS[:1])


def test_a_model_in_training_mode_is_refused():
    model = tiny_model("gpt2").train()
    with pytest.raises(ImplicitICLError, match=r"training mode.*call model\.eval\(\)"):
        compute_patch(model, IDS, IDS[:1])


@pytest.mark.parametrize(("family", "module"), [("llama", "mlp.gate_proj"), ("mixtral", "mlp.gate")])
def test_zero_norm_mlp_input_names_the_layer_and_module(family, module):
    model = tiny_model(family, seed=0)
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight.zero_()
    with pytest.raises(ImplicitICLError, match=rf"layer 1, {module}: the MLP input z without context is a zero"):
        compute_patch(model, IDS, IDS[:1])


def test_other_entry_points_refuse_bad_input():
    with pytest.raises(ImplicitICLError, match="the input is empty"):
        every_position_patches(MODEL, IDS[:0])
    with pytest.raises(ImplicitICLError, match="BertModel has no language-model head"):
        patched_generate(tiny_model("bert"), IDS, IDS[:1], 4)
    with pytest.raises(ImplicitICLError, match="max_new_tokens must be at least 1"):
        patched_generate(MODEL, IDS, IDS[:1], 0)
    with pytest.raises(ImplicitICLError, match=f"at most {MAX_POSITIONS} positions"):
        patched_generate(MODEL, IDS, IDS[:1], MAX_POSITIONS)
    patch = compute_patch(MODEL, IDS, IDS[:1])
    with pytest.raises(ImplicitICLError, match="verify it with the context and query it was computed from"):
        verify_patch(MODEL, IDS[:5], IDS[:1], patch)
