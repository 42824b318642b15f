"""Hooks on the unmodified Hugging Face model: read a context-ful run at chosen (sequence, position) rows.

Decoder layers are called with the hidden states as first positional argument or as `hidden_states=`, and
return a tensor or (Falcon) a tuple whose first entry is the hidden states; the helpers here accept both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from transformers import Cache, PreTrainedModel

from implicit_icl.engine.forward import ForwardInputs, StopForward, run_model
from implicit_icl.engine.spec import FamilySpec, layers_of
from implicit_icl.errors import holds_values


def hidden_argument(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def with_hidden_argument(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def first_output(output: Tensor | tuple) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def hooked(handles: list) -> Iterator[None]:
    """Remove the hook handles on exit, whatever happens inside."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def replayed(outputs: dict[nn.Module, object]) -> Iterator[None]:
    """Modules return the given outputs instead of computing them; their hooks still run. An output may be
    a function of no arguments, called when the module is (inside the pass, where offloaded weights are
    on their device).

    For a one-token reduced pass whose layer inputs are the context-ful ones: a module that reads only
    the layer input at its own position (a q/k/v projection) would compute its context-ful output again."""
    saved = {module: module.__dict__.get("forward") for module in outputs}  # accelerate wraps forward too
    try:
        for module, output in outputs.items():
            module.forward = lambda *args, _output=output, **kwargs: _output() if callable(_output) else _fresh(_output)
        yield
    finally:
        for module, forward in saved.items():
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def _fresh(output: object) -> object:
    """A copy of a replayed tensor, since some models add to a module's output in place (Falcon)."""
    return output.clone() if isinstance(output, Tensor) else output


def attended_to_itself(attention: nn.Module, output_projection: nn.Module, projected: Tensor) -> tuple:
    """What a plain softmax attention module returns for N one-token sequences, each seeing only itself:
    softmax over one key is exactly 1, so each head outputs its key-value head's values, and the output
    projection reads the heads side by side (HF's eager attention and `repeat_kv`, whatever the queries).

    projected: [N, ·] the last input projection's output at each token, ending with its values [N, kv × D]
    (v_proj, or a fused qkv's last columns). Returns ([N, 1, hidden], None), as the module does."""
    head_dim, groups = attention.head_dim, attention.num_key_value_groups
    width = attention.config.num_attention_heads // groups * head_dim
    values = projected[:, projected.shape[-1] - width :].unflatten(-1, (-1, head_dim))  # [N, kv, D]
    heads = values.repeat_interleave(groups, 1) if groups > 1 else values  # [N, heads, D]
    return output_projection(heads.flatten(1)[:, None]), None


def row_reader(rows: Tensor) -> Callable[[Tensor], Tensor]:
    """A function [B, T, ...] -> [N, ...] that copies out rows [N, 2] of (sequence, position index) (a copy:
    some models add to their tensors in place). Consecutive positions of one sequence, as the one-pass
    dynamics reads every copy, are a slice: a plain copy instead of a gather."""
    sequence, position = rows.unbind(-1)
    if holds_values(rows) and len(rows):
        batch, first = rows[0].tolist()
        if sequence.eq(batch).all() and position.equal(torch.arange(first, first + len(rows), device=rows.device)):
            return lambda tensor: tensor[batch, first : first + len(rows)].clone()
    return lambda tensor: tensor[sequence.to(tensor.device), position.to(tensor.device)]


@dataclass(frozen=True)
class ContextStates:
    """The context-ful run read at N rows, per layer l (tensors [N, ...] in the model's dtype).

    layer_inputs[l]: the hidden states entering layer l.
    residual_sums[l]: where the block output is compared (the layer output, or the input of the spec's
        `residual_sum` module).
    outputs[l]: outputs of modules inside the layer, by path: every MLP input matrix, and with `replay`
        the attention input projections and the MLP output matrix too.
    experts[l]: for a mixture of experts, the router's "input", "logits", "scores" and "indices" and the
        experts' "output" (see engine/moe.py); empty otherwise.
    """

    layer_inputs: list[Tensor]
    residual_sums: list[Tensor]
    outputs: list[dict[str, Tensor]]
    experts: list[dict[str, Tensor]]
    logits: Tensor | None = None  # [B, T or K, V], when the run went on through the head


@torch.no_grad()
def record_context(
    model: PreTrainedModel,
    spec: FamilySpec,
    inputs: ForwardInputs,
    rows: Tensor,
    replay: bool = False,
    cache: Cache | None = None,
    head: bool | Tensor = False,
) -> ContextStates:
    """One context-ful forward pass of `inputs` (any batch: plain, padded or with a custom mask), read at
    rows [N, 2] of (sequence, position index); it stops after the last layer.

    replay: also record what a one-token reduced pass can replay instead of recomputing (see `replayed`
    and `FamilySpec.replayed_inputs`).
    cache: the keys and values of the tokens before `inputs` (see `run_model`); the run extends it.
    head: run on through the head and keep the logits: True at every position, or at the position indices
    [K] given (HF's `logits_to_keep`)."""
    layers = layers_of(model, spec)
    n_layers = len(layers)
    sequence, position = rows.to(inputs.input_ids.device).unbind(-1)
    length = inputs.input_ids.shape[1]
    states = ContextStates(
        [None] * n_layers, [None] * n_layers, [{} for _ in range(n_layers)], [{} for _ in range(n_layers)]
    )
    at_positions = row_reader(rows)
    stops = not isinstance(head, Tensor) and not head  # after the last layer

    def at_rows(tensor: Tensor) -> Tensor:  # MoE modules see the batch flattened to [B * T, ...]
        return tensor[(sequence * length + position).to(tensor.device)]

    def record_input(layer: int):
        def hook(module, args, kwargs):
            states.layer_inputs[layer] = at_positions(hidden_argument(args, kwargs))

        return hook

    def record_output(layer: int):
        def hook(module, args, output):
            if spec.residual_sum is None:
                states.residual_sums[layer] = at_positions(first_output(output))
            if layer == n_layers - 1 and stops:
                raise StopForward

        return hook

    def record_sum(layer: int):
        def hook(module, args):
            states.residual_sums[layer] = at_positions(args[0])

        return hook

    def record_matrix(layer: int, path: str):
        def hook(module, args, output):
            states.outputs[layer][path] = at_positions(output)

        return hook

    def record_router(layer: int):
        def hook(module, args, output):
            experts = states.experts[layer]
            experts["input"] = at_rows(args[0])
            experts.update(
                {name: at_rows(value) for name, value in zip(spec.experts.router_outputs, output, strict=True)}
            )

        return hook

    def record_experts(layer: int):
        def hook(module, args, output):
            states.experts[layer]["output"] = at_rows(output)

        return hook

    handles = []
    for layer, module in enumerate(layers):
        if spec.experts is not None:
            handles.append(module.get_submodule(spec.experts.router).register_forward_hook(record_router(layer)))
            handles.append(module.get_submodule(spec.experts.module).register_forward_hook(record_experts(layer)))
        handles.append(module.register_forward_pre_hook(record_input(layer), with_kwargs=True))
        handles.append(module.register_forward_hook(record_output(layer)))
        if spec.residual_sum is not None:
            handles.append(module.get_submodule(spec.residual_sum).register_forward_pre_hook(record_sum(layer)))
        recorded = spec.mlp_inputs
        if replay:
            recorded += spec.replayed_inputs
        for path in recorded:
            handles.append(module.get_submodule(path).register_forward_hook(record_matrix(layer, path)))
    with hooked(handles):
        logits = run_model(model, inputs, cache, logits_to_keep=head if isinstance(head, Tensor) else 0)
    return replace(states, logits=logits)
