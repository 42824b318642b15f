"""Device placement: the engine creates every tensor on the model's device, so a model on a GPU is patched
exactly there. On a machine without CUDA these run on the CPU (the same code path with device "cpu"); with
CUDA they run there too (scripts/gpu_check.py runs this file on a GPU machine)."""

import pytest
import torch

from implicit_icl.hf import compute_patch, compute_patches, patched_generate, prefix_patches, verify_patch
from implicit_icl.models.zoo import VOCAB_SIZE, tiny_model

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _ids(seed: int, length: int) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (length,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
def test_patch_is_exact_on_the_models_device(family, device):
    model = tiny_model(family, seed=2).to(device)
    ids = _ids(0, 20)  # ids on the CPU: the engine moves what it is given
    patch = compute_patch(model, ids[:-2], ids[-2:])
    assert verify_patch(model, ids[:-2], ids[-2:], patch).max_abs_logit_diff <= 1e-5
    assert {p.device.type for p in model.parameters()} == {device}


@pytest.mark.parametrize("device", DEVICES)
def test_batched_patches_dynamics_and_generation_run_on_the_models_device(device):
    model = tiny_model("llama", seed=3).to(device)
    pairs = [(_ids(seed, 12), _ids(seed + 10, 2)) for seed in range(3)]
    for (context, query), patch in zip(pairs, compute_patches(model, pairs), strict=True):
        assert verify_patch(model, context, query, patch).max_abs_logit_diff <= 1e-5
    trajectory = prefix_patches(model, pairs[0][0], pairs[0][1])
    assert len(trajectory.prefix_lengths) == pairs[0][0].numel() + 1 and trajectory.max_abs_logit_diff <= 1e-5
    generation = patched_generate(model, pairs[0][0], pairs[0][1], 4, dtype=torch.float64)
    assert generation.tokens_patched == generation.tokens_with_context
