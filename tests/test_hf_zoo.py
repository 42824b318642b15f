import pytest
import torch

from implicit_icl.engine.spec import SPECS
from implicit_icl.errors import ImplicitICLError
from implicit_icl.models.zoo import ENCODER_FAMILIES, FAMILIES, MAX_POSITIONS, VOCAB_SIZE, ZOO_CASES, tiny_model


def _output(model, input_ids):
    with torch.no_grad():
        output = model(input_ids)
    return output.last_hidden_state if model.config.model_type in ENCODER_FAMILIES else output.logits


def _ids(length, seed=0):
    return torch.randint(0, VOCAB_SIZE, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("family", "variant"), ZOO_CASES)
def test_tiny_model_runs_and_is_deterministic_per_seed(family, variant):
    first = tiny_model(family, variant=variant, seed=3)
    again = tiny_model(family, variant=variant, seed=3)
    other = tiny_model(family, variant=variant, seed=4)
    assert not first.training and first.config.model_type == family
    assert first.config._attn_implementation == "eager"
    ids = _ids(MAX_POSITIONS)
    output = _output(first, ids)
    width = first.config.hidden_size if family in ENCODER_FAMILIES else VOCAB_SIZE
    assert output.shape == (1, MAX_POSITIONS, width) and output.dtype == torch.float64
    assert torch.isfinite(output).all() and output.std() > 0.1  # the random weights carry signal
    assert torch.equal(output, _output(again, ids))
    assert not torch.allclose(output, _output(other, ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtypes_hold_the_same_weights_up_to_the_cast(dtype):
    reference = tiny_model("gemma2", dtype=torch.float64)
    cast = tiny_model("gemma2", dtype=dtype)
    assert cast.config.dtype == dtype
    for (name, expected), (_, actual) in zip(reference.named_parameters(), cast.named_parameters(), strict=True):
        assert actual.dtype == dtype, name
        assert torch.equal(actual, expected.to(dtype)), name


def test_zoo_sizes_avoid_the_defaults():
    configs = {(family, variant): tiny_model(family, variant=variant).config for family, variant in ZOO_CASES}
    assert set(FAMILIES) == {family for family, _ in ZOO_CASES} and len(FAMILIES) == 15
    assert all(config.vocab_size == VOCAB_SIZE for config in configs.values())
    assert {config.tie_word_embeddings for config in configs.values()} == {True, False}
    llama = configs["llama", "default"]
    assert (llama.hidden_size, llama.intermediate_size) == (36, 50)
    assert llama.num_attention_heads // llama.num_key_value_heads == 3  # grouped-query attention
    assert configs["gpt_neox", "parallel"].use_parallel_residual
    assert not configs["gpt_neox", "sequential"].use_parallel_residual
    assert configs["falcon", "new"].new_decoder_architecture and not configs["falcon", "old"].new_decoder_architecture
    assert configs["gemma2", "default"].attn_logit_softcapping and configs["gemma2", "default"].final_logit_softcapping
    assert set(configs["gemma3_text", "default"].layer_types) == {"sliding_attention", "full_attention"}
    mixtral = configs["mixtral", "default"]
    assert (mixtral.num_local_experts, mixtral.num_experts_per_tok) == (4, 2)


def test_norm_scales_and_biases_are_not_left_at_their_initial_values():
    gpt2 = tiny_model("gpt2")
    assert (gpt2.transformer.h[0].ln_1.weight != 1).all() and (gpt2.transformer.h[0].mlp.c_fc.bias != 0).all()
    gemma = tiny_model("gemma")  # stores w of the (1 + w) scale, zero in HF's initialisation
    assert (gemma.model.layers[0].input_layernorm.weight != 0).all()


def test_every_spec_has_a_tiny_model_and_every_tiny_model_a_spec():
    assert set(SPECS) == set(FAMILIES), "add the family's tiny model to models/zoo.py, or its spec to engine/spec.py"


def test_unknown_family_and_variant_are_refused():
    with pytest.raises(ImplicitICLError, match="llama"):
        tiny_model("no-such-family")
    with pytest.raises(ImplicitICLError, match="sequential"):
        tiny_model("gpt_neox", variant="no-such-variant")
