"""A model dispatched by accelerate (layers on the CPU and offloaded to disk): patched exactly, never moved.

Offloaded parameters sit on the meta device inside their modules and are loaded by accelerate's hooks
for each call, so the patch must act through forward hooks there; the model's placement and every
weight must be exactly what they were, also after an exception inside the patch.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from implicit_icl.hf import compute_patch, patched_generate, verify_patch
from implicit_icl.models.zoo import VOCAB_SIZE, tiny_model

# Layer 0 stays on the CPU, every later layer is offloaded to disk.
DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


def _dispatch(root, family: str, variant: str | None = None):
    tiny_model(family, variant=variant, seed=1).save_pretrained(root / "model")
    layers = tiny_model(family, variant=variant).config.num_hidden_layers
    device_map = {**DEVICE_MAP, **{f"model.layers.{i}": "disk" for i in range(1, layers)}}
    model = AutoModelForCausalLM.from_pretrained(
        root / "model",
        device_map=device_map,
        offload_folder=root / "offload",
        dtype=torch.float64,
        attn_implementation="eager",
    )
    return model.eval()


@pytest.fixture(scope="module")
def dispatched(tmp_path_factory):
    return _dispatch(tmp_path_factory.mktemp("offload"), "llama", "tied")


def _placement(model) -> dict:
    return {name: (parameter.device, parameter.dtype) for name, parameter in model.named_parameters()}


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits


def test_patch_on_an_offloaded_model_is_exact_and_moves_nothing(dispatched):
    ids = torch.randint(0, VOCAB_SIZE, (30,), generator=torch.Generator().manual_seed(0))
    assert any(device.type == "meta" for device, _ in _placement(dispatched).values())  # really offloaded
    placement, device_map = _placement(dispatched), dict(dispatched.hf_device_map)
    on_cpu = {name: p.detach().clone() for name, p in dispatched.named_parameters() if p.device.type == "cpu"}
    before = _logits(dispatched, ids)

    patch = compute_patch(dispatched, ids[:-1], ids[-1:])
    verification = verify_patch(dispatched, ids[:-1], ids[-1:], patch)
    assert verification.max_abs_logit_diff <= 1e-9 and max(verification.layer_max_abs_diffs) <= 1e-9
    assert verification.baseline_max_abs_logit_diff > 0.1
    assert any(name.startswith("model.layers.2.") for name in patch.deltas)  # a disk layer was patched

    with pytest.raises(RuntimeError, match="inside the patch"):
        with patch.applied(dispatched):
            raise RuntimeError("inside the patch")
    assert _placement(dispatched) == placement and dispatched.hf_device_map == device_map
    for name, parameter in dispatched.named_parameters():
        if name in on_cpu:
            assert torch.equal(parameter, on_cpu[name]), name
    assert torch.equal(_logits(dispatched, ids), before)


def test_patched_generation_on_an_offloaded_model(dispatched):
    ids = torch.randint(0, VOCAB_SIZE, (12,), generator=torch.Generator().manual_seed(1))
    generation = patched_generate(dispatched, ids[:-1], ids[-1:], max_new_tokens=8, dtype=torch.float64)
    assert generation.agreement == 1.0


@pytest.mark.parametrize("output", ["stable", "norm"])
def test_post_norm_scale_patch_on_an_offloaded_layer(tmp_path, output):
    """The post-norm scale of an offloaded layer is read and patched while accelerate holds it on disk."""
    model = _dispatch(tmp_path, "olmo2")
    assert model.model.layers[1].post_feedforward_layernorm.weight.device.type == "meta"
    ids = torch.randint(0, VOCAB_SIZE, (20,), generator=torch.Generator().manual_seed(2))
    before = _logits(model, ids)
    patch = compute_patch(model, ids[:-1], ids[-1:], output=output)
    verification = verify_patch(model, ids[:-1], ids[-1:], patch)
    assert verification.max_abs_logit_diff <= 1e-9 and max(verification.layer_max_abs_diffs) <= 1e-9
    assert verification.baseline_max_abs_logit_diff > 0.1
    assert torch.equal(_logits(model, ids), before)
