"""The Patch object: applied and removed bit for bit, the same through weights and hooks, saved and loaded."""

import hashlib
from dataclasses import replace

import pytest
import torch

from implicit_icl import Patch
from implicit_icl.errors import ImplicitICLError
from implicit_icl.hf import compute_patch, every_position_patches, verify_patch
from implicit_icl.hf.zoo import VOCAB_SIZE, tiny_model
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
