"""A patch exported as a PEFT LoRA adapter: PEFT's own forward pass reproduces the context."""

import json

import pytest
import torch

from implicit_icl.errors import ImplicitICLError
from implicit_icl.hf import compute_patch, every_position_patches
from implicit_icl.models.zoo import VOCAB_SIZE, tiny_model

peft = pytest.importorskip("peft")

IDS = torch.randint(0, VOCAB_SIZE, (21,), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ["llama", "gpt2", "falcon"])
def test_peft_loads_the_adapter_and_reproduces_the_context(family, tmp_path):
    model = tiny_model(family, seed=1)
    patch = compute_patch(model, IDS[:-1], IDS[-1:])
    patch.to_peft(tmp_path, model)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 1, 1)
    assert config["fan_in_fan_out"] == (family == "gpt2")  # Conv1D stores [in, out]
    assert sorted(config["target_modules"]) == sorted(patch.modules)

    adapted = peft.PeftModel.from_pretrained(tiny_model(family, seed=1), tmp_path)
    with torch.no_grad():
        with_context = model(IDS[None]).logits[0, -1]
        through_peft = adapted(input_ids=IDS[-1:][None], position_ids=torch.tensor([[20]])).logits[0, -1]
        without_adapter = model(IDS[-1:][None], position_ids=torch.tensor([[20]])).logits[0, -1]
    assert (through_peft - with_context).abs().max() < 1e-9
    assert (without_adapter - with_context).abs().max() > 1e-2


def test_shifts_that_lora_cannot_express_are_refused(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ImplicitICLError, match="mlp.down_proj.bias holds a shift that LoRA cannot express"):
        compute_patch(model, IDS[:-1], IDS[-1:], output="bias").to_peft(tmp_path, model)
    with pytest.raises(ImplicitICLError, match="export one entry"):
        every_position_patches(model, IDS).to_peft(tmp_path, model)
    mixtral = tiny_model("mixtral")
    with pytest.raises(ImplicitICLError, match="experts.gate_up_proj holds a stacked shift"):
        compute_patch(mixtral, IDS[:-1], IDS[-1:]).to_peft(tmp_path, mixtral)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_a_rank_three_patch_survives_save_load_and_peft(tmp_path):
    """Rank-3 deltas on gate/up, rank 1 on down: saved, loaded, exported with rank_pattern, loaded by PEFT."""
    from dataclasses import replace

    from implicit_icl import Patch
    from implicit_icl.theory import LowRankUpdate

    model = tiny_model("llama", seed=2, dtype=torch.float32)
    exact = compute_patch(model, IDS[:-1], IDS[-1:], dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    deltas = {}
    for name, delta in exact.deltas.items():
        if "down_proj" in name:
            deltas[name] = delta
            continue
        out, inp = delta.shape
        extra = LowRankUpdate(
            0.05 * torch.randn(out, 2, generator=generator), 0.05 * torch.randn(inp, 2, generator=generator)
        )
        deltas[name] = delta + extra  # rank 3
    patch = replace(exact, deltas=deltas)
    patch.save(tmp_path / "patch")
    loaded = Patch.load(tmp_path / "patch")
    assert {row["kind"] for row in loaded.summary()} == {"rank-3", "rank-1"}
    loaded.to_peft(tmp_path / "adapter", model)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 3 and set(config["rank_pattern"].values()) == {1}
    query, position = IDS[-1:][None], torch.tensor([[20]])
    with torch.no_grad():
        with loaded.applied(model):
            ours = model(query, position_ids=position).logits[0, -1]
        adapted = peft.PeftModel.from_pretrained(tiny_model("llama", seed=2, dtype=torch.float32), tmp_path / "adapter")
        theirs = adapted(input_ids=query, position_ids=position).logits[0, -1]
        plain = model(query, position_ids=position).logits[0, -1]
    assert (ours - theirs).abs().max() <= 1e-5
    assert (ours - plain).abs().max() > 1e-2
