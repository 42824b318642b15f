"""The chained construction of docs/theory.md §5: the exact patch of every layer, from hooks on HF's own forward.

1. One context-ful forward pass records, at the patched position, each layer's input h_C, the outputs of
   the MLP input matrices o_C = W z_C (+ b) and the block output y_C (`capture.record_context`).
2. One reduced forward pass walks the layers. In layer l the patched token's input equals h_C (by
   induction over the layers), and the hooks:
   - input side: when an MLP input matrix is called with z, set ΔW = u v^T with u = o_C − W z (= W (z_C − z);
     the bias cancels) and v = z / ||z||^2, and return its patched output, so the MLP sees what it saw with
     the context;
   - output side: after the layer ran, read the shift δ = y_C − y' that is left and solve for the output
     patch (rank-1 on the output matrix, a bias, or a post-norm scale; theory/output_side.py).
   A reduced input of one token (the query alone, or every position at once as a batch of one-token
   sequences) is fed h_C directly, since nothing else in its layer depends on the patch. A longer reduced
   input (a removed span, a multi-token query) re-runs the layer with its output patch on, because the
   patch also changes the other positions the next layer attends to.
Mixtures of experts (a router and fused experts) get their input and output sides from engine/moe.py.
Nothing here builds a dense delta: the factors come from activations (and, for experts, W (z_C − z)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from implicit_icl.engine.apply import (
    Patch,
    delta_hook,
    deltas_applied,
    hooks_applied,
    model_fingerprint,
    normalized_by,
    onloaded,
)
from implicit_icl.engine.capture import (
    ContextStates,
    attended_to_itself,
    first_output,
    hooked,
    record_context,
    replayed,
    with_hidden_argument,
)
from implicit_icl.engine.forward import ForwardInputs, StopForward, model_device, run_model
from implicit_icl.engine.inputs import PatchInput, TokenIds, as_token_ids, check_length, patch_input
from implicit_icl.engine.moe import ExpertsConstruction
from implicit_icl.engine.spec import OUTPUT_SIDES, FamilySpec, layers_of, layers_path, spec_for
from implicit_icl.errors import ImplicitICLError, safe_squared_norm
from implicit_icl.patch import Delta, Source, concatenate, modules_of
from implicit_icl.theory import LowRankUpdate, output_rank_one, scale_reaching, stable_norm_scale_patch
from implicit_icl.theory.output_side import check_elementwise_scale

ARITHMETIC_DTYPES = (torch.float32, torch.float64)
Pair = tuple[TokenIds, TokenIds]


def compute_patch(
    model: PreTrainedModel,
    context_ids: TokenIds,
    query_ids: TokenIds,
    drop: tuple[int, int] | None = None,
    output: str | None = None,
    dtype: torch.dtype = torch.float64,
) -> Patch:
    """The exact patch of every layer for the last query token.

    With the patch applied, the model fed the reduced input — the query alone at its original absolute
    positions (default), or the context without the span drop = (start, end) followed by the query —
    gives at the last query token the hidden states and logits it gives after the full context.
    output: "down" (rank-1 on the MLP output matrix), "bias" (a steering vector), "norm" or "stable"
    (post-norm scale, for families that normalise the MLP output); default: the family's.
    dtype: the arithmetic dtype of the patch, float32 or float64, whatever the model's dtype.
    """
    return compute_patches(model, [(context_ids, query_ids)], drop=drop, output=output, dtype=dtype)[0]


def compute_patches(
    model: PreTrainedModel,
    pairs: Sequence[Pair],
    drop: tuple[int, int] | None = None,
    output: str | None = None,
    dtype: torch.dtype = torch.float64,
    padding: str = "left",
) -> Patch:
    """`compute_patch` for many (context_ids, query_ids) pairs at once: one padded context-ful forward
    pass, one padded reduced pass. Returns a batched Patch whose entry i is the patch of pair i (apply
    it to the batch of reduced inputs, or index it: patch[i]). padding: "left" or "right", for the
    context-ful pass (the reduced pass is left-padded so that every patched token is the last one)."""
    spec, output = check_settings(model, output, dtype)
    if not pairs:
        raise ImplicitICLError("no (context, query) pairs given; give at least one")
    inputs = [patch_input(model, context, query, drop) for context, query in pairs]
    alone = all(item.kept.numel() == 1 for item in inputs)
    if spec.experts is not None and not alone and len(inputs) > 1:
        # A router is not linear in its input, so several reduced sequences cannot share one layer re-run.
        return concatenate([compute_patches(model, [pair], drop, output, dtype) for pair in pairs])
    device = model_device(model)
    full = ForwardInputs.padded([item.full for item in inputs], side=padding).to(device)
    lengths = torch.tensor([item.full.numel() for item in inputs])
    last = torch.full_like(lengths, full.input_ids.shape[1] - 1) if padding == "left" else lengths - 1
    states = record_context(model, spec, full, torch.stack([torch.arange(len(inputs)), last], -1), replay=alone)
    reduced = ForwardInputs.padded([item.full[item.kept] for item in inputs], [item.kept for item in inputs])
    deltas = chain_patches(model, spec, states, reduced.to(device), output, dtype, feed_context_inputs=alone)
    return assemble_patch(model, deltas, output, dtype, [_source(item) for item in inputs], drop)


def every_position_patches(
    model: PreTrainedModel, input_ids: TokenIds, output: str | None = None, dtype: torch.dtype = torch.float64
) -> Patch:
    """Each token's own patch, its context being the tokens before it, from one context-ful forward pass.

    Returns a batched Patch: entry i makes token i alone at position i produce what it produces after
    tokens 0..i−1 (entry 0 has no context and is zero up to rounding; in a bidirectional encoder the
    context is every other token). Apply it with `patch.applied` to the batch of one-token sequences
    ids[:, None] at positions arange(T)[:, None].
    """
    spec, output = check_settings(model, output, dtype)
    ids = as_token_ids("input ids", input_ids, model)
    if ids.numel() == 0:
        raise ImplicitICLError("the input is empty; give at least one token")
    check_length(model, ids.numel())
    device = model_device(model)
    ids = ids.to(device)
    positions = torch.arange(ids.numel(), device=device)
    rows = torch.stack([torch.zeros_like(positions), positions], -1)
    states = record_context(model, spec, ForwardInputs.plain(ids[None]), rows, replay=True)
    reduced = ForwardInputs.plain(ids[:, None], positions[:, None])
    deltas = chain_patches(model, spec, states, reduced, output, dtype, feed_context_inputs=True)
    sources = [Source(tuple(ids[:i].tolist()), (int(ids[i]),), (i,)) for i in range(ids.numel())]
    return assemble_patch(model, deltas, output, dtype, sources, None)


def check_settings(model: PreTrainedModel, output: str | None, dtype: torch.dtype) -> tuple[FamilySpec, str]:
    """The family's spec and the output side to use, after refusing what no construction can do."""
    spec = spec_for(model)
    if model.training:
        raise ImplicitICLError("the model is in training mode, where dropout makes two runs differ; call model.eval()")
    if dtype not in ARITHMETIC_DTYPES:
        raise ImplicitICLError(f"patch arithmetic runs in float32 or float64, not {dtype}; pick one of those")
    output = output or spec.default_output
    if output not in OUTPUT_SIDES:
        raise ImplicitICLError(f"unknown output side {output!r}; choose one of {', '.join(OUTPUT_SIDES)}")
    if output not in spec.output_sides:
        raise ImplicitICLError(
            f"{model.config.model_type} cannot take output {output!r}: {spec.output_sides_reason}; "
            f"use {' or '.join(spec.output_sides)}"
        )
    return spec, output


def _source(item: PatchInput) -> Source:
    n = item.full.numel() - item.query_length
    return Source(tuple(item.full[:n].tolist()), tuple(item.full[n:].tolist()), tuple(item.kept.tolist()))


def assemble_patch(model, deltas, output, dtype, sources: list[Source], drop) -> Patch:
    """The batched Patch of `deltas` (full parameter names), with its sources and the model's fingerprint."""
    modules = modules_of(deltas)
    return Patch(
        deltas=deltas,
        family=model.config.model_type,
        n_layers=model.config.num_hidden_layers,
        dtype=dtype,
        output=output,
        sources=tuple(sources),
        drop=drop,
        batched=True,
        fingerprint=model_fingerprint(model, modules),
    )


@torch.no_grad()
def chain_patches(
    model: PreTrainedModel,
    spec: FamilySpec,
    states: ContextStates,
    reduced: ForwardInputs,
    output: str,
    dtype: torch.dtype,
    feed_context_inputs: bool,
) -> dict[str, Delta]:
    """One reduced forward pass of `reduced` [N, S] that builds every layer's patch (see the module
    docstring), from the context-ful states recorded at N rows. The patched token is the last of each
    reduced sequence (pad on the left); deltas come batched over N, keyed by full parameter name.

    feed_context_inputs: the reduced sequences are one token each, so every layer is fed its recorded
    context-ful input and replays what it can (no re-run of any layer)."""
    mode = "fed" if feed_context_inputs else "rerun"
    return _construct(model, spec, states, reduced, output, dtype, mode)[0]


@torch.no_grad()
def patched_token_logits(
    model: PreTrainedModel, spec: FamilySpec, states: ContextStates, reduced: ForwardInputs, output: str, dtype
) -> tuple[dict[str, Delta], Tensor]:
    """`chain_patches` for one-token reduced sequences [N, 1] that run on as the patched model runs them:
    each layer gets the previous patched layer's output, its input side patched as it is built and its
    output side's effect added to the layer output (computed by the patched modules from their inputs).
    So the one pass that builds the patch also gives the logits of the tokens alone under it: [N, V].
    For a mixture of experts the layer is re-run with its output side instead."""
    deltas, logits = _construct(model, spec, states, reduced, output, dtype, "rerun" if spec.experts else "add")
    return deltas, logits[:, -1]


def _construct(model, spec, states, reduced, output, dtype, mode: str) -> tuple[dict[str, Delta], Tensor | None]:
    """The construction pass in one of three modes: "fed", "rerun" or "add" (see `_LayerConstruction`)."""
    layers = layers_of(model, spec)
    constructions = [
        _LayerConstruction(index, layer, spec, states, output, dtype, mode, last=index == len(layers) - 1)
        for index, layer in enumerate(layers)
    ]
    handles = [handle for construction in constructions for handle in construction.register()]
    replay = {}
    if mode == "fed":
        for construction in constructions:
            replay.update(construction.replay_outputs())
    with hooked(handles), replayed(replay):
        logits = run_model(model, reduced)
    prefix = layers_path(model, spec)
    deltas = {
        f"{prefix}.{construction.index}.{name}": delta
        for construction in constructions
        for name, delta in construction.deltas.items()
    }
    return deltas, logits


class _LayerConstruction:
    """The hooks that build one layer's patch during the reduced forward pass.

    Deltas are keyed by parameter path inside the layer and batched over the N reduced sequences; the
    patched token is position −1 of each. mode: how the pass goes on after the layer's output side is
    solved: "fed" (one-token inputs; the next layer is fed its context-ful input), "rerun" (the layer runs
    again with its output side, which also moves the other positions) or "add" (one-token inputs; the
    output side's effect is added to this token's layer output)."""

    def __init__(self, index, layer: nn.Module, spec, states, output, dtype, mode: str, last):
        self.index, self.layer, self.spec, self.states = index, layer, spec, states
        self.output, self.dtype, self.mode, self.last = output, dtype, mode, last
        self.feed_context_inputs = mode == "fed"
        self.deltas: dict[str, Delta] = {}
        self.seen: dict[str, Tensor] = {}  # the reduced run's values at the patched token
        self.raw: dict[str, Tensor] = {}  # the same, [N, 1, ·] in the model's dtype ("add" mode only)
        self.rerunning = False
        self.experts = None
        if spec.experts is not None:
            self.experts = ExpertsConstruction(
                layer,
                index,
                spec.experts,
                states.experts[index],
                self.deltas,
                dtype,
                other_tokens=mode == "rerun",
            )

    def register(self) -> list:
        layer, spec = self.layer, self.spec
        handles = [
            layer.register_forward_pre_hook(self._feed_input, with_kwargs=True),
            layer.register_forward_hook(self._solve_output_side, with_kwargs=True),
        ]
        if self.experts is not None:
            handles += self.experts.register()
        if spec.mlp_output is not None:
            output_matrix = layer.get_submodule(spec.mlp_output)
            handles.append(output_matrix.register_forward_hook(self._record("inner", "mlp_output")))
        handles += [layer.get_submodule(path).register_forward_hook(self._input_side(path)) for path in spec.mlp_inputs]
        if spec.post_mlp_norm is not None:
            norm = layer.get_submodule(spec.post_mlp_norm)
            handles.append(norm.register_forward_hook(self._record("norm_input", "norm_output")))
        if spec.residual_sum is not None:
            summed = layer.get_submodule(spec.residual_sum)
            handles.append(summed.register_forward_hook(self._record("residual_sum", None)))
        return handles

    def replay_outputs(self) -> dict[nn.Module, object]:
        """Modules whose outputs a one-token reduced pass replays (capture.replayed): the attention reads
        the context-ful layer input, so a plain one returns its own values through its output projection
        (`attended_to_itself`) and any other its input projections' recorded outputs; the MLP's output side
        reads the context-ful activation once the input side is patched."""
        outputs, spec, layer = self.states.outputs[self.index], self.spec, self.layer
        paths = spec.replayed_inputs
        replay = {}
        if spec.attends_to_itself:
            attention, values = layer.get_submodule(spec.attention), outputs[paths[0]]
            output_projection = layer.get_submodule(spec.attention_output)
            replay[attention] = lambda: attended_to_itself(attention, output_projection, values)
            paths = paths[1:]
        replay.update({layer.get_submodule(path): outputs[path][:, None] for path in paths})  # [N, 1, out]
        if self.experts is not None:
            replay.update(self.experts.replay_outputs())  # MoE modules see rows [N, ...]
        return replay

    def _query(self, tensor: Tensor) -> Tensor:
        return tensor[:, -1].to(self.dtype)

    def _feed_input(self, module, args, kwargs):
        """A one-token reduced input gets the context-ful layer input (the induction hypothesis)."""
        if self.feed_context_inputs:
            return with_hidden_argument(args, kwargs, self.states.layer_inputs[self.index][:, None])
        return None

    def _record(self, input_key: str, output_key: str | None):
        def hook(module, args, output):
            if self.rerunning:
                return
            recorded = {input_key: args[0]} if output_key is None else {input_key: args[0], output_key: output}
            for key, tensor in recorded.items():
                self.seen[key] = self._query(tensor)
                if self.mode == "add":  # only `_output_side_effect` reads them, after the layer has run on
                    self.raw[key] = tensor[:, -1:].clone()

        return hook

    def _input_side(self, path: str):
        """ΔW = (o_C − W z) z^T / ||z||^2 on an MLP input matrix, then its patched output."""
        name = f"{path}.weight"

        def hook(module, args, output):
            if name not in self.deltas:
                z = self._query(args[0])
                try:
                    squared = safe_squared_norm("the MLP input z without context", z)
                except ImplicitICLError as error:
                    raise ImplicitICLError(f"layer {self.index}, {path}: {error}") from None
                context_output = self.states.outputs[self.index][path]
                self.deltas[name] = LowRankUpdate.rank_one(
                    context_output.to(self.dtype) - self._query(output), z / squared[:, None]
                )
            if self.feed_context_inputs:  # every reduced token is a patched one: (W + ΔW) z = W z_C
                return self.states.outputs[self.index][path][:, None]
            return delta_hook({"weight": self.deltas[name]}, batched=True)(module, args, output)

        return hook

    def _solve_output_side(self, module, args, kwargs, output):
        """After the input-side-patched layer ran: patch the output side to add δ = y_C − y'."""
        if self.rerunning:
            return None
        reduced_sum = self.seen["residual_sum"] if self.spec.residual_sum else self._query(first_output(output))
        shift = self.states.residual_sums[self.index].to(self.dtype) - reduced_sum
        try:
            output_deltas = self._output_side(shift)
        except ImplicitICLError as error:
            raise ImplicitICLError(
                f"layer {self.index}, {self.spec.mlp_output or self.spec.experts.module}: {error}"
            ) from None
        self.deltas.update(output_deltas)
        if self.feed_context_inputs:
            if self.last:
                raise StopForward
            return None  # the next layer is fed its context-ful input anyway
        if self.mode == "add":
            return _with_added(output, self._output_side_effect(output_deltas))
        self.rerunning = True
        try:
            with self._output_side_applied(module, output_deltas):
                return module(*args, **kwargs)
        finally:
            self.rerunning = False

    def _output_side_applied(self, layer: nn.Module, output_deltas: dict[str, Delta]):
        """For the re-run: output deltas through hooks; MoE deltas (one reduced sequence) in the weights
        where they can be (a router and fused experts are not linear in their input)."""
        if self.experts is None:
            return hooks_applied(layer, output_deltas, batched=True)
        return deltas_applied(layer, {name: delta[0] for name, delta in self.deltas.items()})

    def _output_side_effect(self, output_deltas: dict[str, Delta]) -> Tensor:
        """How far the output side's patch moves this token's layer output [N, 1, d]: the patched output
        modules (as `Patch.applied` computes them) minus what they gave, from their recorded inputs. The
        MLP output (or its post-norm) joins the residual stream directly in every decoder."""
        spec = self.spec

        def patched(path: str, module_input: Tensor, module_output: Tensor) -> Tensor:
            """The module's output with its deltas on (a norm is re-run even without: its input moved)."""
            deltas = {
                name.removeprefix(f"{path}."): d for name, d in output_deltas.items() if name.startswith(f"{path}.")
            }
            return delta_hook(deltas, batched=True)(self.layer.get_submodule(path), (module_input,), module_output)

        moved = patched(spec.mlp_output, self.raw["inner"], self.raw["mlp_output"]) - self.raw["mlp_output"]
        if spec.post_mlp_norm is None:
            return moved
        norm_output = self.raw["norm_output"]
        return patched(spec.post_mlp_norm, self.raw["norm_input"] + moved, norm_output) - norm_output

    def _output_side(self, shift: Tensor) -> dict[str, Delta]:
        if self.experts is not None:
            return self.experts.output_side(shift)
        spec, inner = self.spec, self.seen["inner"]
        if self.output == "down":
            return {f"{spec.mlp_output}.weight": output_rank_one(shift, inner)}
        if self.output == "bias":
            return {f"{spec.mlp_output}.bias": shift}
        norm = self.layer.get_submodule(spec.post_mlp_norm)
        with onloaded(norm):
            scale = norm.weight.to(self.dtype) + spec.norm_offset
        mlp_output, deltas = self.seen["norm_input"], {}
        if self.output == "norm":
            check_elementwise_scale(scale, shift)
        if self.output == "stable":
            eps = getattr(norm, spec.norm_eps)
            down, _ = stable_norm_scale_patch(shift, mlp_output, inner, scale, eps)
            mlp_output = mlp_output + down.apply(inner)
            deltas[f"{spec.mlp_output}.weight"] = down
        # The scale is solved elementwise against the norm's own normalisation of the (moved) MLP output:
        # HF normalises in float32 even in float64 models, and the theory's float64 n(m) differs from that
        # by ~1e-7, which would cap the patch's precision there. After the stable variant's rank-1 move the
        # normalised output is parallel to the target, so the division is well-conditioned.
        target = self.seen["norm_output"] + shift
        normalized = normalized_by(norm, mlp_output, 1.0 - spec.norm_offset).to(self.dtype)
        deltas[f"{spec.post_mlp_norm}.weight"] = scale_reaching(target, normalized) - scale
        return deltas


def _with_added(output: Tensor | tuple, shift: Tensor) -> Tensor | tuple:
    """A layer's output (a tensor or a tuple led by the hidden states) with shift added to its last token."""
    hidden = first_output(output)
    hidden = torch.cat([hidden[:, :-1], hidden[:, -1:] + shift], 1)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
