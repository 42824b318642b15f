"""One declarative spec per model family: where the engine hooks a Hugging Face model, and nothing else.

The chained construction (THEORY.md §5) works on the unmodified model through forward hooks, so it needs
to know only module paths; it never re-implements attention or norms. A spec has these fields (module
paths are relative to one decoder layer unless said otherwise):

- `layers`: path of the ModuleList of layers from the model root ("model.layers", "transformer.h").
- `mlp_inputs`: the matrices that read the MLP input z (gate and up, a fused gate_up, c_fc, fc1, ...). They
  all get a rank-1 update with the same right factor z/||z||^2, which makes them output what they output
  with the context.
- `mlp_output`: the matrix that writes the MLP output (down_proj, c_proj, fc2, ...): the rank-1 output-side
  patch (output="down") or the bias shift (output="bias") goes there.
- `post_mlp_norm`: the norm applied to the MLP output before it joins the residual stream (Gemma 2/3, OLMo
  2), or None. Needed for the norm-scale patches (output="norm" or "stable"), whose solvers need the
  norm's scale offset `norm_offset` (Gemma stores w and scales by 1 + w) and its epsilon.
- `residual_sum`: where the block output δ is read. None: the layer's output (pre-norm blocks, sequential
  or parallel: the shift δ = y_C − y' is read after the fact, so the block's wiring does not matter).
  A module path: that module's input, for post-LayerNorm blocks (BERT: "output.LayerNorm"), where the sum
  r + MLP(z) must match before the final norm.
- `default_output`: the output-side patch used when the caller does not choose one.

What the spec deliberately leaves out, because the hooks find it: GPT-2's Conv1D orientation (weights
[in, out]) is detected from the module type at the boundary where a patch is applied; whether a layer
returns a tensor or a tuple (Falcon) is handled by the hooks; parallel and sequential blocks need no flag.

Adding a family: write its spec below, keyed by `config.model_type`, and add it to the family tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedModel

from implicit_icl.errors import ImplicitICLError

OutputSide = Literal["down", "bias", "norm", "stable"]
OUTPUT_SIDES: tuple[str, ...] = ("down", "bias", "norm", "stable")


@dataclass(frozen=True)
class FamilySpec:
    """Module paths and flags of one model family (see the module docstring)."""

    layers: str
    mlp_inputs: tuple[str, ...]
    mlp_output: str
    post_mlp_norm: str | None = None
    norm_offset: float = 0.0
    residual_sum: str | None = None
    default_output: OutputSide = "down"


_GATED = FamilySpec(layers="model.layers", mlp_inputs=("mlp.gate_proj", "mlp.up_proj"), mlp_output="mlp.down_proj")

SPECS: dict[str, FamilySpec] = {
    "llama": _GATED,
    "mistral": _GATED,
    "qwen2": _GATED,
    "qwen3": _GATED,
    "phi3": FamilySpec(layers="model.layers", mlp_inputs=("mlp.gate_up_proj",), mlp_output="mlp.down_proj"),
    "gpt2": FamilySpec(layers="transformer.h", mlp_inputs=("mlp.c_fc",), mlp_output="mlp.c_proj"),
    "gpt_neox": FamilySpec(layers="gpt_neox.layers", mlp_inputs=("mlp.dense_h_to_4h",), mlp_output="mlp.dense_4h_to_h"),
    "phi": FamilySpec(layers="model.layers", mlp_inputs=("mlp.fc1",), mlp_output="mlp.fc2"),
    "falcon": FamilySpec(layers="transformer.h", mlp_inputs=("mlp.dense_h_to_4h",), mlp_output="mlp.dense_4h_to_h"),
}


def spec_for(model: PreTrainedModel) -> FamilySpec:
    """The spec of the model's family, looked up by `config.model_type`."""
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in SPECS:
        raise ImplicitICLError(
            f"unsupported model family {family!r}; supported: {', '.join(sorted(SPECS))}. To add one, write "
            "its FamilySpec (module paths of layers and MLP matrices) in implicit_icl/hf/spec.py"
        )
    return SPECS[family]
