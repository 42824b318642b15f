"""Export a patch's rank-1 deltas as a PEFT LoRA adapter (rank 1, scaling 1), loadable by `PeftModel`.

A delta u v^T on the weight of module M becomes
    base_model.model.M.lora_A.weight = v^T  [1, in]
    base_model.model.M.lora_B.weight = u    [out, 1]
with r = lora_alpha = 1, so that PEFT adds (lora_alpha / r) · B A = u v^T. GPT-2's Conv1D modules need
fan_in_fan_out (A and B keep the same orientation). Bias and norm-scale deltas have no LoRA form, and
fused experts are parameters rather than modules, so patches holding them are refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from implicit_icl.atomic import write_atomically
from implicit_icl.errors import ImplicitICLError
from implicit_icl.patch import Patch
from implicit_icl.theory import RankOneUpdate

ENCODER_TASK = "FEATURE_EXTRACTION"


def save_lora(patch: Patch, directory: str | os.PathLike, model: nn.Module) -> Path:
    """Write adapter_model.safetensors and adapter_config.json for `patch` on `model` into `directory`."""
    patch.check_matches(model)
    if patch.batched:
        raise ImplicitICLError("a batched patch has one adapter per position; export one entry, e.g. patch[i]")
    modules, tensors = [], {}
    for name, delta in patch.deltas.items():
        module_name, attribute = name.rsplit(".", 1)
        if not isinstance(delta, RankOneUpdate) or attribute != "weight":
            raise ImplicitICLError(
                f"{name} holds a {'stacked ' if isinstance(delta, RankOneUpdate) else ''}shift that LoRA cannot "
                "express; export a patch computed with output='down' on a model without fused experts"
            )
        modules.append(module_name)
        prefix = f"base_model.model.{module_name}"
        tensors[f"{prefix}.lora_A.weight"] = delta.v[None].contiguous().cpu()
        tensors[f"{prefix}.lora_B.weight"] = delta.u[:, None].contiguous().cpu()
    conv1d = {isinstance(model.get_submodule(module_name), Conv1D) for module_name in modules}
    if len(conv1d) > 1:
        raise ImplicitICLError("the patch mixes Conv1D and Linear modules, which one LoRA config cannot describe")
    config = dict(
        peft_type="LORA",
        task_type="CAUSAL_LM" if model.can_generate() else ENCODER_TASK,
        base_model_name_or_path=getattr(model.config, "_name_or_path", None) or None,
        r=1,
        lora_alpha=1,
        lora_dropout=0.0,
        bias="none",
        target_modules=modules,
        fan_in_fan_out=conv1d == {True},
        inference_mode=True,
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / "adapter_model.safetensors", lambda path: save_file(tensors, path))
    write_atomically(
        directory / "adapter_config.json", lambda path: Path(path).write_text(json.dumps(config, indent=2))
    )
    return directory
