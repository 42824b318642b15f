"""A patch merged into a copy of the model's weights and saved as an ordinary Hugging Face checkpoint.

The deltas are added densely (U V^T, once) to a deep copy; the user's model is never touched. The result is
written with `save_pretrained` (safetensors) into a staging folder that replaces the target whole, so
`AutoModelForCausalLM.from_pretrained(directory)` loads the patched model with no library of ours.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from implicit_icl.atomic import build_staged_folder, publish_folder
from implicit_icl.engine.apply import Patch, add_delta_, owner
from implicit_icl.engine.spec import layers_of, spec_for
from implicit_icl.errors import ImplicitICLError


def save_merged(model: PreTrainedModel, patch: Patch, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Write a copy of `model` with the patch added to its weights (densely: U V^T, once) as a Hugging Face
    checkpoint (`save_pretrained`, safetensors) that `AutoModelForCausalLM.from_pretrained` loads.

    The user's model is not touched. A bias on a module without one exists in the checkpoint only if the
    family's configuration can switch MLP biases on (`mlp_bias`, Llama-style; the other MLP matrices then get
    zero biases); otherwise it is refused in one line. The folder appears whole or not at all."""
    if patch.batched:
        raise ImplicitICLError("a batched patch holds one patch per entry; merge one entry, e.g. patch[i]")
    patch.check_matches(model)
    merged = copy.deepcopy(model)
    new_biases = _new_biases(merged, patch)
    with torch.no_grad():
        for name, delta in patch.deltas.items():
            add_delta_(*owner(merged, name), delta)
        for module in new_biases:
            if module.bias is None:
                module.bias = nn.Parameter(torch.zeros_like(module.weight[:, 0]), requires_grad=False)
    directory = Path(directory)
    staging = build_staged_folder(directory, lambda folder: _save(merged, tokenizer, folder))
    try:
        publish_folder(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _save(merged: PreTrainedModel, tokenizer, folder: Path) -> None:
    merged.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _new_biases(merged: PreTrainedModel, patch: Patch) -> list[nn.Module]:
    """The MLP matrices that must carry a (zero) bias once the config switches `mlp_bias` on, or a refusal."""
    missing = [
        name for name, delta in patch.deltas.items() if name.endswith(".bias") and owner(merged, name)[0].bias is None
    ]
    if not missing:
        return []
    if not hasattr(merged.config, "mlp_bias"):
        raise ImplicitICLError(
            f"{missing[0]} adds a bias to a module without one, and {merged.config.model_type}'s configuration cannot "
            "declare MLP biases, so no checkpoint of this family can hold it; save the patch instead (--save)"
        )
    merged.config.mlp_bias = True
    spec = spec_for(merged)
    paths = (*spec.mlp_inputs, spec.mlp_output)
    return [layer.get_submodule(path) for layer in layers_of(merged, spec) for path in paths]
