"""Export a patch's low-rank deltas as a PEFT LoRA adapter (scaling 1), loadable by `PeftModel`.

A delta U V^T of rank k on the weight of module M becomes
    base_model.model.M.lora_A.weight = V^T  [k, in]
    base_model.model.M.lora_B.weight = U    [out, k]
with r = lora_alpha = k, so that PEFT adds (lora_alpha / r) · B A = U V^T. Modules of different ranks
share one adapter through `rank_pattern` and `alpha_pattern` (the most common rank is the default).
GPT-2's Conv1D modules need fan_in_fan_out (A and B keep the same orientation). Bias and norm-scale
deltas have no LoRA form, and fused experts are parameters rather than modules, so patches holding them
are refused.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from implicit_icl.atomic import write_atomically
from implicit_icl.errors import ImplicitICLError
from implicit_icl.patch import PatchData
from implicit_icl.theory import LowRankUpdate

ENCODER_TASK = "FEATURE_EXTRACTION"


def save_lora(patch: PatchData, directory: str | os.PathLike, model: nn.Module) -> Path:
    """Write adapter_model.safetensors and adapter_config.json for `patch` on `model` into `directory`."""
    if patch.batched:
        raise ImplicitICLError("a batched patch has one adapter per entry; export one entry, e.g. patch[i]")
    ranks, tensors = {}, {}
    for name, delta in patch.deltas.items():
        module_name, attribute = name.rsplit(".", 1)
        if not isinstance(delta, LowRankUpdate) or attribute != "weight" or delta.batch_shape:
            raise ImplicitICLError(
                f"{name} holds a {'stacked ' if isinstance(delta, LowRankUpdate) else ''}shift that LoRA cannot "
                "express; export a patch computed with output='down' on a model without fused experts"
            )
        ranks[module_name] = delta.rank
        prefix = f"base_model.model.{module_name}"
        tensors[f"{prefix}.lora_A.weight"] = delta.V.T.contiguous().cpu()
        tensors[f"{prefix}.lora_B.weight"] = delta.U.contiguous().cpu()
    conv1d = {isinstance(model.get_submodule(module_name), Conv1D) for module_name in ranks}
    if len(conv1d) > 1:
        raise ImplicitICLError("the patch mixes Conv1D and Linear modules, which one LoRA config cannot describe")
    rank = Counter(ranks.values()).most_common(1)[0][0]
    others = {module_name: other for module_name, other in ranks.items() if other != rank}
    config = dict(
        peft_type="LORA",
        task_type="CAUSAL_LM" if model.can_generate() else ENCODER_TASK,
        base_model_name_or_path=getattr(model.config, "_name_or_path", None) or None,
        r=rank,
        lora_alpha=rank,
        rank_pattern=others,
        alpha_pattern=others,
        lora_dropout=0.0,
        bias="none",
        target_modules=list(ranks),
        fan_in_fan_out=conv1d == {True},
        inference_mode=True,
    )
    directory = Path(directory)
    write_atomically(directory / "adapter_model.safetensors", lambda path: save_file(tensors, path))
    write_atomically(
        directory / "adapter_config.json", lambda path: Path(path).write_text(json.dumps(config, indent=2))
    )
    return directory
