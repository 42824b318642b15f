"""One declarative spec per model family: where the engine hooks a Hugging Face model, and nothing else.

The chained construction (docs/theory.md §5) works on the unmodified model through forward hooks, so it
needs to know only module paths; it never re-implements attention or norms. A spec has these fields (module
paths are relative to one decoder layer unless said otherwise):

- `layers`: path of the ModuleList of layers from the base model ("layers", "h", "encoder.layer"), so that
  a model with any head (…ForCausalLM, GPT2LMHeadModel, a bare GPT2Model) resolves it the same way.
- `encoder`: a bidirectional encoder (BERT), loaded as the bare model and never asked to generate.
- `mlp_inputs`: the matrices that read the MLP input z (gate and up, a fused gate_up, c_fc, fc1, ...). They
  all get a rank-1 update with the same right factor z/||z||^2, which makes them output what they output
  with the context.
- `mlp_output`: the matrix that writes the MLP output (down_proj, c_proj, fc2, ...): the rank-1 output-side
  patch (output="down") or the bias shift (output="bias") goes there.
- `post_mlp_norm`: the norm applied to the MLP output before it joins the residual stream (Gemma 2/3, OLMo
  2), or None. Needed for the norm-scale patches (output="norm" or "stable"), whose solvers need the
  norm's scale offset `norm_offset` (Gemma stores w and scales by 1 + w) and the name of its epsilon
  attribute `norm_eps` ("eps" in Gemma, "variance_epsilon" in Llama-style RMSNorms).
- `post_attention_norm`: the norm applied to the attention output before it joins the residual stream
  (Gemma 2/3, OLMo 2), or None. The engine never needs it; a function vector maps its heads through it.
- `residual_sum`: where the block output δ is read. None: the layer's output (pre-norm blocks, sequential
  or parallel: the shift δ = y_C − y' is read after the fact, so the block's wiring does not matter).
  A module path: that module's input, for post-LayerNorm blocks (BERT: "output.LayerNorm"), where the sum
  r + MLP(z) must match before the final norm.
- `default_output`: the output-side patch used when the caller does not choose one.
- `experts`: for a mixture of experts, an `ExpertsSpec` (router path, the fused experts module and its
  parameter names, the router's outputs); `mlp_inputs` is then empty and `mlp_output` None, and
  engine/moe.py builds that part of the patch.
- `attention_inputs`: the projections the attention reads the layer input with (q/k/v or a fused qkv).
  Speed only: in a one-token reduced pass their input is the context-ful one, so the engine replays their
  recorded outputs instead of recomputing them. Leave it empty and they are recomputed. Their parent is
  the attention module (`FamilySpec.attention`), after which a layer's keys and values are cached.
- `plain_attention`: the family's eager attention is softmax(softcap(q kᵀ · scaling) + mask) v through HF's
  attention interface, nothing else (no sinks, no bias, no scaling of its own). Speed only: the one-pass
  dynamics then splits the copies' attention in two (analyses/dynamics/attention.py).
- `attention_output`: with `plain_attention`, the attention's output projection (o_proj, dense), whose
  input is the heads' outputs side by side, head h reading key-value head h // (heads / key-value heads);
  the last attention input must end with the values (v_proj, or a fused qkv's last columns). Speed only:
  softmax over one key is exactly 1, so a token that sees only itself gets its own values through this
  projection, and a one-token reduced pass replays the attention whole from its recorded values.

What the spec deliberately leaves out, because the hooks find it: GPT-2's Conv1D orientation (weights
[in, out]) is detected from the module type at the boundary where a patch is applied; whether a layer
returns a tensor or a tuple (Falcon) is handled by the hooks; parallel and sequential blocks need no flag.

Adding a family: write its spec below, keyed by `config.model_type`, and a tiny model of it in models/zoo.py (a
test fails while a spec has no tiny model, or a tiny model no spec); the family tests take it from there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from torch import nn
from transformers import PreTrainedModel

from implicit_icl.errors import ImplicitICLError

OutputSide = Literal["down", "bias", "norm", "stable"]
OUTPUT_SIDES: tuple[str, ...] = ("down", "bias", "norm", "stable")


@dataclass(frozen=True)
class ExpertsSpec:
    """A mixture of experts, Mixtral layout: `router` (path in the layer) returns `router_outputs`, the
    names of (logits [N, E], scores [N, k], indices [N, k]); `module` (path in the layer) holds the fused
    matrices `gate_up` [E, 2I, H] (gate rows first) and `down` [E, H, I] and the activation `activation`."""

    router: str = "mlp.gate"
    module: str = "mlp.experts"
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    activation: str = "act_fn"
    router_outputs: tuple[str, ...] = ("logits", "scores", "indices")


@dataclass(frozen=True)
class FamilySpec:
    """Module paths and flags of one model family (see the module docstring)."""

    layers: str
    mlp_inputs: tuple[str, ...]
    mlp_output: str | None
    encoder: bool = False
    post_mlp_norm: str | None = None
    norm_offset: float = 0.0
    norm_eps: str = "variance_epsilon"
    post_attention_norm: str | None = None
    residual_sum: str | None = None
    default_output: OutputSide = "down"
    experts: ExpertsSpec | None = None
    attention_inputs: tuple[str, ...] = ()
    plain_attention: bool = False
    attention_output: str | None = None

    @property
    def attention(self) -> str | None:
        """Path of the attention module (the parent of its input projections), None without them."""
        if not self.attention_inputs:
            return None
        return self.attention_inputs[0].rpartition(".")[0] or None

    @property
    def attends_to_itself(self) -> bool:
        """Whether a one-token reduced pass replays the attention whole (see `attention_output`)."""
        return self.plain_attention and self.attention_output is not None

    @property
    def replayed_inputs(self) -> tuple[str, ...]:
        """The modules whose context-ful outputs a one-token reduced pass replays or reads: the attention's
        values alone where it replays the attention whole, else every attention input; the MLP output."""
        attention = self.attention_inputs[-1:] if self.attends_to_itself else self.attention_inputs
        return attention + ((self.mlp_output,) if self.mlp_output else ())

    @property
    def output_sides(self) -> tuple[str, ...]:
        """The output-side patches that are exact for this family."""
        if self.post_mlp_norm is not None:
            return ("norm", "stable")
        return ("down",) if self.experts is not None else ("down", "bias")

    @property
    def output_sides_reason(self) -> str:
        if self.post_mlp_norm is not None:
            return f"it normalises the MLP output ({self.post_mlp_norm}), so only that norm's scale adds δ exactly"
        if self.experts is not None:
            return "its fused experts have neither biases nor a norm after them"
        return "it has no norm after its MLP"


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATED = FamilySpec(
    layers="layers",
    mlp_inputs=("mlp.gate_proj", "mlp.up_proj"),
    mlp_output="mlp.down_proj",
    attention_inputs=_QKV,
    plain_attention=True,
    attention_output="self_attn.o_proj",
)

# Gemma 2/3 normalise the MLP output before the residual sum, so only the norm scale can add δ exactly. The
# elementwise scale patch divides by n(m_C) and so amplifies any later perturbation where it is small; the
# stable variant (rank-1 on down_proj first) is as exact and much better conditioned, hence the default.
_GEMMA_POST_NORM = replace(
    _GATED,
    post_mlp_norm="post_feedforward_layernorm",
    norm_offset=1.0,
    norm_eps="eps",
    post_attention_norm="post_attention_layernorm",
    default_output="stable",
)

SPECS: dict[str, FamilySpec] = {
    "llama": _GATED,
    "mistral": _GATED,
    "qwen2": _GATED,
    "qwen3": _GATED,
    "phi3": FamilySpec(
        layers="layers",
        mlp_inputs=("mlp.gate_up_proj",),
        mlp_output="mlp.down_proj",
        attention_inputs=("self_attn.qkv_proj",),
        plain_attention=True,
        attention_output="self_attn.o_proj",
    ),
    "gpt2": FamilySpec(
        layers="h", mlp_inputs=("mlp.c_fc",), mlp_output="mlp.c_proj", attention_inputs=("attn.c_attn",)
    ),
    "gpt_neox": FamilySpec(
        layers="layers",
        mlp_inputs=("mlp.dense_h_to_4h",),
        mlp_output="mlp.dense_4h_to_h",
        attention_inputs=("attention.query_key_value",),
    ),
    "phi": FamilySpec(
        layers="layers",
        mlp_inputs=("mlp.fc1",),
        mlp_output="mlp.fc2",
        attention_inputs=_QKV,
        plain_attention=True,
        attention_output="self_attn.dense",
    ),
    "falcon": FamilySpec(
        layers="h",
        mlp_inputs=("mlp.dense_h_to_4h",),
        mlp_output="mlp.dense_4h_to_h",
        attention_inputs=("self_attention.query_key_value",),
    ),
    "mixtral": FamilySpec(
        layers="layers",
        mlp_inputs=(),
        mlp_output=None,
        experts=ExpertsSpec(),
        attention_inputs=_QKV,
        plain_attention=True,
        attention_output="self_attn.o_proj",
    ),
    # Gemma's pre-norms scale by (1 + w), but only post-MLP norms are patched, so Gemma 1 is Llama here.
    "gemma": _GATED,
    "gemma2": _GEMMA_POST_NORM,
    "gemma3_text": _GEMMA_POST_NORM,
    # OLMo 2 has no pre-norm: the MLP reads the residual stream, and its output is normalised.
    "olmo2": replace(_GEMMA_POST_NORM, norm_offset=0.0, norm_eps="variance_epsilon"),
    # Post-LayerNorm encoder: y = LN(r + W_out a + b); the sum before output.LayerNorm must match.
    "bert": FamilySpec(
        layers="encoder.layer",
        encoder=True,
        mlp_inputs=("intermediate.dense",),
        mlp_output="output.dense",
        residual_sum="output.LayerNorm",
        attention_inputs=("attention.self.query", "attention.self.key", "attention.self.value"),
    ),
}


def spec_for(model: PreTrainedModel) -> FamilySpec:
    """The spec of the model's family, looked up by `config.model_type`."""
    return spec_for_family(getattr(getattr(model, "config", None), "model_type", None))


def spec_for_family(family: str | None) -> FamilySpec:
    """The spec of a `config.model_type`, or a one-line error naming the supported families."""
    if family not in SPECS:
        raise ImplicitICLError(
            f"unsupported model family {family!r}; supported: {', '.join(sorted(SPECS))}. To add one, write "
            "its FamilySpec (module paths of layers and MLP matrices) in implicit_icl/engine/spec.py"
        )
    return SPECS[family]


def layers_path(model: nn.Module, spec: FamilySpec) -> str:
    """The full module path of the layer list from the model's root, whatever head sits on the base model
    ("model.layers" under LlamaForCausalLM, "transformer.h" under GPT2LMHeadModel, "h" in a bare GPT2Model)."""
    base = getattr(model, "base_model", model)
    prefix = next(name for name, module in model.named_modules() if module is base)
    return f"{prefix}.{spec.layers}" if prefix else spec.layers


def layers_of(model: nn.Module, spec: FamilySpec) -> nn.ModuleList:
    return model.get_submodule(layers_path(model, spec))
