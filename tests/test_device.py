"""Device placement: the engine creates every tensor on the model's device, so a model on a GPU is patched
exactly there. On a machine without CUDA these run on the CPU (the same code path with device "cpu"); with
CUDA they run there too (scripts/gpu_check.py runs this file on a GPU machine).

Without a GPU the audit runs on the "meta" device, whose tensors have shapes and no values: a model there runs
shape-only (value checks skip it, `errors.holds_values`), and a tensor the engine made on the CPU instead of the
model's device meets the model's and, in most operations, raises as it would on a GPU."""

import pytest
import torch

from implicit_icl.analyses.dynamics.series import layer_series
from implicit_icl.engine.forward import ForwardInputs, run_model
from implicit_icl.engine.growing import GrowingContext
from implicit_icl.hf import compute_patch, compute_patches, patched_generate, prefix_patches, verify_patch
from implicit_icl.models.zoo import VOCAB_SIZE, ZOO_CASES, tiny_model
from implicit_icl.theory import LowRankUpdate

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


# Mixtral's routing (nonzero) and BERT's mask (padding_mask.all()) read values inside HF's own code.
META_CASES = [case for case in ZOO_CASES if case[0] not in ("mixtral", "bert")]


def _layout(patch) -> dict:
    """Every delta's name and shapes (a low-rank one's two factors)."""
    return {
        name: [delta.U.shape, delta.V.shape] if isinstance(delta, LowRankUpdate) else [delta.shape]
        for name, delta in patch.deltas.items()
    }


@pytest.mark.parametrize(("family", "variant"), META_CASES)
def test_on_the_meta_device_patches_dynamics_and_series_make_no_tensor_elsewhere(family, variant):
    model = tiny_model(family, variant=variant, seed=0)
    ids = _ids(0, 12)
    reference = compute_patches(model, [(ids[:-2], ids[-2:]), (ids[:-3], ids[-3:])], drop=(2, 5))
    model.to("meta")
    patches = compute_patches(model, [(ids[:-2], ids[-2:]), (ids[:-3], ids[-3:])], drop=(2, 5))
    assert _layout(patches) == _layout(reference)  # the same computation, shape for shape
    trajectory = prefix_patches(model, ids[:-1], ids[-1:])  # verified: the patches applied through hooks
    series = layer_series(model, trajectory)
    tensors = [trajectory.context_logits, trajectory.patched_logits, series.alignment, series.remainder_norms]
    assert {t.device.type for t in tensors} == {"meta"}
    assert series.update_norms.shape == (model.config.num_hidden_layers, 12)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
def test_on_the_meta_device_weights_patches_and_cached_generation_make_no_tensor_elsewhere(family):
    model = tiny_model(family, seed=0).to("meta")
    ids = _ids(1, 12)
    patch = compute_patch(model, ids[:-2], ids[-2:])
    with patch.applied(model, via="weights"):
        logits = run_model(model, ForwardInputs.plain(ids[None, -2:], torch.arange(10, 12)[None]).to("meta"))
    growing = GrowingContext(model, ids[:5], None, torch.float32)
    steps = [growing.step(token, head=True) for token in ids[5:8].tolist()]
    assert logits.device.type == "meta" and {step.context_logits.device.type for step in steps} == {"meta"}
