"""Check a patch the way a sceptic would: run both paths through HF's own forward and compare.

The patched model fed the reduced input must reproduce, at the patched token, the logits and every
layer's output of the model fed the full context; the unpatched model fed the reduced input is the
baseline that shows how much the context mattered (and that the patched path really ran).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel

from implicit_icl.engine.apply import Patch
from implicit_icl.engine.capture import first_output, hooked
from implicit_icl.engine.forward import ForwardInputs, model_device, run_model
from implicit_icl.engine.inputs import TokenIds, as_token_ids, patch_input
from implicit_icl.engine.spec import layers_of, spec_for
from implicit_icl.errors import ImplicitICLError


@dataclass(frozen=True)
class Verification:
    """Max absolute differences to the context-ful model at the patched token(s).

    max_abs_logit_diff: patched model, context removed. baseline_max_abs_logit_diff: unpatched, context
    removed. layer_max_abs_diffs[l]: patched vs context-ful output of layer l. top1_match: the patched
    model's top-1 token equals the context-ful one (at every patched token).
    """

    max_abs_logit_diff: float
    baseline_max_abs_logit_diff: float
    layer_max_abs_diffs: list[float]
    top1_match: bool

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def verify_patch(model: PreTrainedModel, context_ids: TokenIds, query_ids: TokenIds, patch: Patch) -> Verification:
    """Compare the patched model on the reduced input of `patch` (query alone, or the context without
    patch.drop, then the query) with the model on context + query, at the last query token."""
    inputs = patch_input(model, context_ids, query_ids, patch.drop)
    if patch.batched or patch.positions != (inputs.full.numel() - 1,):
        raise ImplicitICLError(
            f"the patch is for position(s) {patch.positions}, not the last query token at {inputs.full.numel() - 1}; "
            "verify it with the context and query it was computed from"
        )
    device = model_device(model)
    full, kept = inputs.full.to(device), inputs.kept.to(device)
    last = torch.tensor([full.numel() - 1], device=device)
    context_run = _read_run(model, full[None], torch.arange(full.numel(), device=device)[None], last)
    return _compare(model, context_run, full[kept][None], kept[None], patch)


@torch.no_grad()
def verify_every_position(model: PreTrainedModel, input_ids: TokenIds, patch: Patch) -> Verification:
    """Compare each token alone at its position, under its own patch (a batched patch from
    `every_position_patches`), with the same token after all the tokens before it."""
    ids = as_token_ids("input ids", input_ids, model).to(model_device(model))
    positions = torch.arange(ids.numel(), device=ids.device)
    if not patch.batched or patch.positions != tuple(positions.tolist()):
        raise ImplicitICLError("verify_every_position needs the batched patch of every position of these ids")
    context_run = _read_run(model, ids[None], positions[None], positions)
    return _compare(model, context_run, ids[:, None], positions[:, None], patch)


def _compare(model, context_run, reduced_ids: Tensor, reduced_positions: Tensor, patch: Patch) -> Verification:
    last = torch.tensor([reduced_ids.shape[1] - 1], device=reduced_ids.device)
    baseline_logits, _ = _read_run(model, reduced_ids, reduced_positions, last, per_sequence=True)
    patched = _patched_run(model, patch, reduced_ids, reduced_positions, last)
    context_logits, context_layers = context_run
    patched_logits, patched_layers = patched
    return Verification(
        max_abs_logit_diff=_max_diff(patched_logits, context_logits),
        baseline_max_abs_logit_diff=_max_diff(baseline_logits, context_logits),
        layer_max_abs_diffs=[_max_diff(p, c) for p, c in zip(patched_layers, context_layers, strict=True)],
        top1_match=bool((patched_logits.argmax(-1) == context_logits.argmax(-1)).all()),
    )


def _patched_run(model, patch: Patch, reduced_ids: Tensor, reduced_positions: Tensor, last: Tensor):
    """The patched run; a batched patch on a mixture of experts (no hook can patch its router) goes one
    sequence at a time, each with its own entry added to the weights."""
    if not patch.batched or spec_for(model).experts is None:
        with patch.applied(model):
            return _read_run(model, reduced_ids, reduced_positions, last, per_sequence=True)
    runs = []
    for entry in range(len(patch)):
        with patch[entry].applied(model):
            runs.append(
                _read_run(model, reduced_ids[entry : entry + 1], reduced_positions[entry : entry + 1], last, True)
            )
    logits = torch.cat([run_logits for run_logits, _ in runs])
    layers = [torch.cat(layer_outputs) for layer_outputs in zip(*(run_layers for _, run_layers in runs), strict=True)]
    return logits, layers


def _read_run(
    model: PreTrainedModel, input_ids: Tensor, position_ids: Tensor, index: Tensor, per_sequence: bool = False
) -> tuple[Tensor, list[Tensor]]:
    """Logits and layer outputs [N, ...] of one forward pass: at positions `index` of the single sequence,
    or (per_sequence) at position `index` of every sequence of the batch."""
    select: Callable[[Tensor], Tensor] = (
        (lambda t: t[:, index.to(t.device)].flatten(0, 1)) if per_sequence else (lambda t: t[0, index.to(t.device)])
    )
    layer_outputs = []
    handles = [
        layer.register_forward_hook(lambda module, args, output: layer_outputs.append(select(first_output(output))))
        for layer in layers_of(model, spec_for(model))
    ]
    with hooked(handles):
        logits = run_model(model, ForwardInputs.plain(input_ids, position_ids))
    return select(logits), layer_outputs


def _max_diff(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double().to(a.device)).abs().max())
