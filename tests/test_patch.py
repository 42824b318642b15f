"""The Patch object: applied and removed bit for bit, the same through weights and hooks, saved and loaded."""

import hashlib
from dataclasses import replace

import pytest
import torch

from implicit_icl import Patch
from implicit_icl.errors import ImplicitICLError
from implicit_icl.hf import compute_patch, every_position_patches, verify_patch
from implicit_icl.models.zoo import VOCAB_SIZE, tiny_model
from implicit_icl.theory import LowRankUpdate

IDS = torch.randint(0, VOCAB_SIZE, (25,), generator=torch.Generator().manual_seed(0))
CONTEXT, QUERY = IDS[:-1], IDS[-1:]


def _state_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _query_logits(model, position=24):
    with torch.no_grad():
        return model(QUERY[None], position_ids=torch.tensor([[position]])).logits[0, -1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("output", ["down", "bias"])
def test_weights_restored_bit_for_bit_on_exit_and_on_exception(dtype, output):
    model = tiny_model("llama", seed=1, dtype=dtype)  # bias-free MLP: the bias patch creates a bias
    patch = compute_patch(model, CONTEXT, QUERY, output=output, dtype=torch.float32)
    before = _state_hash(model)
    with patch.applied(model):
        assert _state_hash(model) != before
    assert _state_hash(model) == before
    with pytest.raises(RuntimeError, match="inside"), patch.applied(model):
        raise RuntimeError("raised inside the patched block")
    assert _state_hash(model) == before
    assert all(layer.mlp.down_proj.bias is None for layer in model.model.layers)


@pytest.mark.parametrize(
    ("family", "output"),
    [("gpt2", "down"), ("llama", "bias"), ("mixtral", "down"), ("olmo2", "norm"), ("gemma2", "stable")],
)
def test_weights_and_hooks_agree(family, output):
    """Hooks add u (v·x) to Linear and Conv1D outputs (GPT-2 stores [in, out]: only the in-place path
    transposes) and re-run norms, routers and fused experts with shifted parameters."""
    model = tiny_model(family, seed=2)
    patch = compute_patch(model, CONTEXT, QUERY, output=output)
    with patch.applied(model, via="weights"):
        through_weights = _query_logits(model)
    with patch.applied(model, via="hooks"):
        through_hooks = _query_logits(model)
    torch.testing.assert_close(through_weights, through_hooks, rtol=0, atol=1e-12)
    assert (through_weights - _query_logits(model)).abs().max() > 1e-2


def test_conv1d_deltas_keep_the_linear_orientation():
    patch = compute_patch(tiny_model("gpt2"), CONTEXT, QUERY)
    assert patch.deltas["transformer.h.0.mlp.c_fc.weight"].shape == (50, 36)  # [out, in]; Conv1D stores [36, 50]


def test_dense_delta_matches_the_factors_and_the_summary():
    model = tiny_model("llama", seed=0)
    patch = compute_patch(model, CONTEXT, QUERY)
    rows = patch.summary()
    assert [row["layer"] for row in rows] == [0, 0, 0, 1, 1, 1]
    assert {row["kind"] for row in rows} == {"rank-1"}
    for row in rows:
        delta = patch.deltas[row["parameter"]]
        dense = delta.dense()
        assert torch.linalg.matrix_rank(dense) == 1
        assert row["norm"] == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-12)
    assert patch.modules == [row["parameter"].removesuffix(".weight") for row in rows]
    assert repr(patch) == "Patch(llama, 2 layers, 6 deltas, output='down', float64, position 24)"


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model("llama", variant="tied", seed=3)  # MLP biases exist here
    patch = compute_patch(model, CONTEXT, QUERY, drop=(2, 9), output="bias")
    patch.save(tmp_path / "patch")
    loaded = Patch.load(tmp_path / "patch")
    assert sorted(p.name for p in (tmp_path / "patch").iterdir()) == ["patch.json", "patch.safetensors"]
    assert (loaded.family, loaded.n_layers, loaded.dtype, loaded.output, loaded.positions, loaded.drop) == (
        "llama",
        3,
        torch.float64,
        "bias",
        (24,),
        (2, 9),
    )
    for name, delta in patch.deltas.items():
        other = loaded.deltas[name]
        if isinstance(delta, LowRankUpdate):
            assert torch.equal(delta.U, other.U) and torch.equal(delta.V, other.V)
        else:
            assert torch.equal(delta, other)
    assert verify_patch(model, CONTEXT, QUERY, loaded).max_abs_logit_diff < 1e-9


@pytest.mark.parametrize("damage", ["truncated tensors", "edited metadata"])
def test_a_corrupt_saved_patch_is_refused_in_one_line(tmp_path, damage):
    model = tiny_model("llama", seed=0)
    directory = compute_patch(model, CONTEXT, QUERY).save(tmp_path / "patch")
    if damage == "truncated tensors":
        path = directory / "patch.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    else:
        (directory / "patch.json").write_text('{"family": "llama"')
    with pytest.raises(ImplicitICLError, match="is corrupt") as raised:
        Patch.load(directory)
    assert "\n" not in str(raised.value)


def test_loading_checks_the_patch_fits_the_model(tmp_path):
    patch = compute_patch(tiny_model("llama", seed=0), CONTEXT, QUERY)
    with pytest.raises(ImplicitICLError, match="computed for a 'llama' model, not 'gpt2'"):
        with patch.applied(tiny_model("gpt2")):
            pass
    deeper = compute_patch(tiny_model("llama", variant="tied"), CONTEXT, QUERY)
    with pytest.raises(ImplicitICLError, match="computed for 3 layers but the model has 2"):
        with deeper.applied(tiny_model("llama")):
            pass
    model = tiny_model("llama")
    (name, delta), *_ = patch.deltas.items()
    renamed = replace(patch, deltas={name.replace("gate_proj", "gate"): delta})
    with pytest.raises(ImplicitICLError, match="has no module model.layers.0.mlp.gate;"):
        with renamed.applied(model):
            pass
    cut = replace(patch, deltas={name: LowRankUpdate(delta.U[:-1], delta.V)})
    with pytest.raises(ImplicitICLError, match=r"shape \(49, 36\) but the model's parameter has \(50, 36\)"):
        with cut.applied(model):
            pass
    with pytest.raises(ImplicitICLError, match="holds no saved patch"):
        Patch.load(tmp_path)


def test_batched_patches_go_through_hooks_only():
    model = tiny_model("qwen2", seed=1)
    patches = every_position_patches(model, IDS)
    with pytest.raises(ImplicitICLError, match="batched"):
        with patches.applied(model, via="weights"):
            pass
    with pytest.raises(ImplicitICLError, match="not batched"):
        patches[3][0]
    with patches[24].applied(model):  # one entry is an ordinary patch, added to the weights
        single = _query_logits(model)
    torch.testing.assert_close(single, model(IDS[None]).logits[0, -1].detach(), rtol=0, atol=1e-9)


def test_a_patch_for_another_checkpoint_is_refused_and_nothing_changes():
    patch = compute_patch(tiny_model("llama", seed=0), CONTEXT, QUERY)
    other = tiny_model("llama", seed=1)  # same config, other weights: another checkpoint
    before = _state_hash(other)
    with pytest.raises(ImplicitICLError, match="belongs to another model: the weights differ") as raised:
        with patch.applied(other):
            pass
    assert "\n" not in str(raised.value) and "force=True" in str(raised.value)
    assert _state_hash(other) == before
    fine_tuned = tiny_model("llama", seed=0)
    with torch.no_grad():
        fine_tuned.model.layers[1].mlp.up_proj.weight[3, 4] += 1e-3  # one weight, one layer
    with pytest.raises(ImplicitICLError, match="1 of the 6 parameters.*model.layers.1.mlp.up_proj.weight"):
        with patch.applied(fine_tuned):
            pass
    with patch.applied(other, force=True):  # knowingly
        assert _state_hash(other) != before
    assert _state_hash(other) == before


def test_the_same_checkpoint_in_another_dtype_is_accepted():
    patch = compute_patch(tiny_model("llama", seed=0, dtype=torch.float32), CONTEXT, QUERY, dtype=torch.float32)
    with patch.applied(tiny_model("llama", seed=0, dtype=torch.bfloat16)):
        pass
    loaded_config = replace(patch.fingerprint, config={**patch.fingerprint.config, "hidden_size": 48})
    with pytest.raises(ImplicitICLError, match="configuration differs \\(hidden_size 48 vs 36\\)"):
        with replace(patch, fingerprint=loaded_config).applied(tiny_model("llama", seed=0)):
            pass


def test_weights_restored_after_an_exception_inside_a_hooked_patch():
    model = tiny_model("llama", seed=1)
    patches = every_position_patches(model, IDS)
    before = _state_hash(model)
    with pytest.raises(RuntimeError, match="inside"), patches.applied(model):
        raise RuntimeError("raised inside the patched block")
    assert _state_hash(model) == before and not any(module._forward_hooks for module in model.modules())


def test_the_saved_sidecar_says_where_the_patch_came_from(tmp_path):
    import json

    model = tiny_model("llama", seed=0)
    patch = compute_patch(model, CONTEXT, QUERY, drop=(3, 7), dtype=torch.float32)
    metadata = json.loads((patch.save(tmp_path / "patch") / "patch.json").read_text())
    (source,) = metadata["sources"]
    assert source["context_ids"] == CONTEXT.tolist() and source["query_ids"] == QUERY.tolist()
    assert source["kept"] == [*range(3), *range(7, 25)]
    assert (metadata["output"], metadata["dtype"], metadata["library_version"]) == ("down", "float32", "0.2.0")
    assert metadata["fingerprint"]["config"]["hidden_size"] == 36
    assert set(metadata["fingerprint"]["weights"]) == {f"{module}.weight" for module in patch.modules}
    metadata["output"] = "bias"  # an edited sidecar, still valid JSON
    (tmp_path / "patch" / "patch.json").write_text(json.dumps(metadata))
    with pytest.raises(ImplicitICLError, match="is corrupt: edited or incomplete"):
        Patch.load(tmp_path / "patch")
