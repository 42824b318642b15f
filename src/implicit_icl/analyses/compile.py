"""A context compiled into one query-independent patch: least-squares fits chained through the layers
(docs/theory.md §7, after [M]).

The exact patch of §5 serves one query. Here one patch serves every query: given a context C and K
calibration queries, each layer's deltas are the ridge fits (`theory.least_squares`) that map the calibration
tokens' reduced states, computed under the already fitted lower layers, to their context-ful targets.

1. `record_calibration`: one padded forward pass of the K sequences [C, q_k] records, at every query token,
   each layer's block output y_C and the outputs o_C = W z_C (+ b) of its MLP input matrices
   (`capture.record_context`).
2. `fit_patch`: one forward pass of the K queries alone (left-padded, at the positions they have after C).
   In layer l, hooks on the unmodified model
   - input side: when an MLP input matrix is called with Z, fit ΔW = ridge(D = O_C − W Z, Z) over the chosen
     tokens (the rank-r truncation inside the chain, if asked) and return (W + ΔW) z for every token;
   - output side: once the layer has run with its input side patched, fit the output matrix against the
     residual difference R = Y_C − Y' that is left: ΔW_out = ridge(R, A) on the inner activations A read by
     the output matrix, or a bias Δb = ridge_bias(R) (one steering vector per layer); since the output
     matrix is linear, its effect ΔW_out a (or Δb) is added to the layer's output for every token, so
     the next layer reads the states the patch will really produce.
   Behind a post-MLP norm (Gemma 2/3, OLMo 2: y = h + s ⊙ n(m)) the output side is the stable form of §4
   with one scale for all tokens: the branch must give T = R + s ⊙ n(m'); ΔW_out = ridge(m* − m', A) moves
   each m' towards m* = α T ⊘ ŝ (ŝ: s with its small entries raised, `working_norm_scale`), and the new
   scale κ ŝ takes κ from a least-squares fit over the tokens (`theory.shared_scale_multiple`).
   Ridges are multiples of trace(Z Z^T)/dim of the fitted tokens (`CompileSettings.ridge`).
With one calibration query, its last token, ridge 0 and full rank, every fit is the exact rank-1 patch of
§2/§4 for that query, so the compiled patch is `construct.compute_patch`'s (behind a post-MLP norm it is
another exact patch for that query: a uniform scale where the stable form's is elementwise).

Supported: causal decoders whose MLP output enters the residual stream through a plain matrix, with or
without a post-MLP norm (no fused experts, no post-LayerNorm block).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from implicit_icl.engine.apply import Patch, forward_with, model_fingerprint, normalized_by, onloaded
from implicit_icl.engine.capture import ContextStates, first_output, hooked, record_context
from implicit_icl.engine.forward import ForwardInputs, StopForward, model_device, run_model
from implicit_icl.engine.inputs import as_token_ids, check_length
from implicit_icl.engine.queries import checked_queries, reduced_inputs
from implicit_icl.engine.spec import FamilySpec, layers_of, layers_path, spec_for
from implicit_icl.errors import ImplicitICLError
from implicit_icl.patch import Delta, modules_of
from implicit_icl.theory import LowRankUpdate, shared_norm_targets, shared_scale_fit, working_norm_scale
from implicit_icl.theory.least_squares import (
    best_rank_fit,
    relative_ridge,
    ridge_bias,
    ridge_solved,
    ridge_update,
    truncated,
)
from implicit_icl.theory.output_side import STABLE_SCALE_FLOOR

TOKEN_CHOICES = ("all", "last", "all+first")
OUTPUT_CHOICES = ("down", "bias", "none")


@dataclass(frozen=True)
class CompileSettings:
    """How a compiled patch is fitted.

    ridge: λ of every fit as a multiple of trace(Z Z^T)/dim of its fitted inputs (0: least squares,
        minimum norm); a bias is a weight on the constant input 1, so its λ is ridge · T. Behind a post-MLP
        norm the same multiple also holds the shared scale's log-shift near the working scale
        (`shared_norm_targets`).
    tokens: which calibration tokens are fitted: "all" (every query token but the first, which alone is an
        attention sink; a one-token query keeps its token), "last" (the last token), "all+first" (every token).
    rank: truncate every matrix delta to this rank (None: full rank, at most the number of fitted tokens).
    truncation: "chain" (each layer fitted against the truncated layers below) or "after" (truncate the
        full-rank chain's deltas at the end).
    rank_fit: "svd" (the SVD truncation of the full-rank fit) or "data" (the best rank-r fit of the ridge
        objective, P_r ΔW*; theory.least_squares.best_rank_fit).
    input_side: fit the MLP input matrices; output: "down" (the MLP output matrix, and behind a post-MLP
        norm that norm's scale too), "bias" (a steering vector on its bias; not behind a post-MLP norm) or
        "none".
    """

    ridge: float = 1.0
    tokens: Literal["all", "last", "all+first"] = "all"
    rank: int | None = None
    truncation: Literal["chain", "after"] = "chain"
    rank_fit: Literal["svd", "data"] = "svd"
    input_side: bool = True
    output: Literal["down", "bias", "none"] = "down"

    def __post_init__(self) -> None:
        if not self.ridge >= 0:
            raise ImplicitICLError(f"the ridge multiple must be ≥ 0, got {self.ridge}")
        if self.tokens not in TOKEN_CHOICES:
            raise ImplicitICLError(f"tokens must be one of {', '.join(TOKEN_CHOICES)}, not {self.tokens!r}")
        if self.rank is not None and self.rank < 1:
            raise ImplicitICLError(f"the rank must be ≥ 1 (or None for full rank), got {self.rank}")
        if self.truncation not in ("chain", "after") or self.rank_fit not in ("svd", "data"):
            raise ImplicitICLError("truncation must be 'chain' or 'after', and rank_fit 'svd' or 'data'")
        if self.output not in OUTPUT_CHOICES:
            raise ImplicitICLError(f"output must be one of {', '.join(OUTPUT_CHOICES)}, not {self.output!r}")
        if not self.input_side and self.output == "none":
            raise ImplicitICLError("a patch with neither input side nor output side changes nothing; enable one")

    @property
    def label(self) -> str:
        """A short name, e.g. "down λ=1 all r=8"."""
        sides = ("in+" if self.input_side else "") + self.output
        rank = "" if self.rank is None else f" r={self.rank}{'' if self.truncation == 'chain' else ' after'}"
        return f"{sides} λ={self.ridge:g} {self.tokens}{rank}"


@dataclass(frozen=True)
class Calibration:
    """The context-ful run of K calibration queries, read at every query token.

    context_ids: [C]; queries: K tensors [Q_k]; rows: [N, 2] of (query index, token index in the query), one
    per recorded token, query after query; states: `ContextStates` at those N rows."""

    context_ids: Tensor
    queries: tuple[Tensor, ...]
    rows: Tensor
    states: ContextStates = field(repr=False)

    def __len__(self) -> int:
        return len(self.queries)

    def last_token_inputs(self) -> Tensor:
        """Every query's last token's state entering each layer (what a task vector reads): [L, K, d], float32."""
        last = torch.tensor([q.numel() for q in self.queries]).cumsum(0) - 1  # rows are query after query
        return torch.stack([state[last.to(state.device)].float().cpu() for state in self.states.layer_inputs])


def bias_steers(model: PreTrainedModel) -> bool:
    """Whether a bias on the MLP output can steer the model: not behind a norm of the MLP output (Gemma 2/3)."""
    return spec_for(model).post_mlp_norm is None


def _check_family(model: PreTrainedModel) -> FamilySpec:
    spec = spec_for(model)
    if model.training:
        raise ImplicitICLError("the model is in training mode, where dropout makes two runs differ; call model.eval()")
    family = model.config.model_type
    if spec.encoder or spec.residual_sum is not None:
        raise ImplicitICLError(f"{family} is a post-LayerNorm encoder; compiled patches need a causal decoder")
    if spec.experts is not None or spec.mlp_output is None:
        raise ImplicitICLError(
            f"{family} routes its MLP through experts; compiled patches need one MLP output matrix (Llama, Qwen, "
            "Mistral, GPT-2, Gemma, ...)"
        )
    return spec


@torch.no_grad()
def record_calibration(model: PreTrainedModel, context_ids, queries: Sequence) -> Calibration:
    """One padded forward pass of [context, query_k] for every calibration query, recorded at every query token."""
    spec = _check_family(model)
    context = as_token_ids("context ids", context_ids, model)
    if context.numel() == 0:
        raise ImplicitICLError("the context is empty, so there is nothing to compile; give a context")
    queries = checked_queries(model, queries, "calibration query")
    check_length(model, context.numel() + max(query.numel() for query in queries))
    full = ForwardInputs.padded([torch.cat([context, query]) for query in queries], side="right")
    rows = torch.tensor([(k, j) for k, query in enumerate(queries) for j in range(query.numel())])
    at = torch.stack([rows[:, 0], rows[:, 1] + context.numel()], -1)
    states = record_context(model, spec, full.to(model_device(model)), at)
    return Calibration(context, tuple(queries), rows, states)


def compile_patch(
    model: PreTrainedModel,
    context_ids,
    queries: Sequence,
    settings: CompileSettings | None = None,
    dtype: torch.dtype = torch.float32,
    **changes,
) -> Patch:
    """The query-independent patch of `context_ids`, fitted on the calibration `queries` (token ids each).

    settings: a `CompileSettings` (default: `CompileSettings()`); keyword arguments change single fields,
    e.g. `compile_patch(model, context, queries, rank=8, ridge=10.0)`. Apply the patch with
    `patch.applied(model)` and feed a query alone at the positions it would have after the context (context
    length + 0, 1, ...; `patch.notes["position_offset"]`; with rotary embeddings any offset gives the same
    result). dtype: of the stored deltas (the fits run in float64)."""
    try:
        settings = replace(settings or CompileSettings(), **changes)
    except TypeError as error:
        raise ImplicitICLError(f"unknown compile setting: {error}; see CompileSettings") from None
    return fit_patch(model, record_calibration(model, context_ids, queries), settings, dtype)


@torch.no_grad()
def fit_patch(
    model: PreTrainedModel,
    calibration: Calibration,
    settings: CompileSettings = CompileSettings(),
    dtype: torch.dtype = torch.float32,
    subset: Sequence[int] | None = None,
) -> Patch:
    """The chained fit of module docstring step 2, on the recorded calibration (or the queries `subset` of it)."""
    spec = _check_family(model)
    if settings.output == "bias" and not bias_steers(model):
        raise ImplicitICLError(
            f"{model.config.model_type} normalises its MLP output, so a bias before that norm is no steering "
            "vector; use output 'down' (the output matrix and the norm's scale)"
        )
    if dtype not in (torch.float32, torch.float64):
        raise ImplicitICLError(f"compiled patches are stored in float32 or float64, not {dtype}")
    chosen = list(range(len(calibration))) if subset is None else list(subset)
    if not chosen or not all(0 <= k < len(calibration) for k in chosen):
        raise ImplicitICLError(f"the subset must hold query indices in [0, {len(calibration)}), got {chosen[:5]}")
    queries = [calibration.queries[k] for k in chosen]
    offset = calibration.context_ids.numel()
    recorded, reduced_rows = _fitted_rows(calibration, chosen, settings.tokens)
    reduced = reduced_inputs(queries, offset).to(model_device(model))
    layers = layers_of(model, spec)
    fits = [
        _LayerFit(layer, spec, settings, _Targets(calibration.states, index, recorded), reduced_rows)
        for index, layer in enumerate(layers)
    ]
    fits[-1].last = True
    with hooked([handle for fit in fits for handle in fit.register()]):
        run_model(model, reduced)
    prefix = layers_path(model, spec)
    deltas: dict[str, Delta] = {}
    for index, fit in enumerate(fits):
        for name, delta in fit.deltas.items():
            if isinstance(delta, LowRankUpdate) and settings.rank is not None and settings.truncation == "after":
                delta = _truncate(delta, fit.inputs.get(name), fit.ridges[name], settings)
            deltas[f"{prefix}.{index}.{name}"] = delta.to(dtype)
    modules = modules_of(deltas)
    notes = dict(
        method="compiled",
        **asdict(settings),
        context_ids=calibration.context_ids.tolist(),
        position_offset=offset,
        calibration_queries=len(chosen),
        fitted_tokens=int(reduced_rows.shape[0]),
    )
    return Patch(
        deltas=deltas,
        family=model.config.model_type,
        n_layers=model.config.num_hidden_layers,
        dtype=dtype,
        output="compiled",
        fingerprint=model_fingerprint(model, modules),
        notes=notes,
    )


def _fitted_rows(calibration: Calibration, chosen: list[int], tokens: str) -> tuple[Tensor, Tensor]:
    """Which recorded rows are fitted ([T] indices into calibration.rows), and where those tokens sit in the
    left-padded reduced batch of the chosen queries ([T, 2] of (batch row, column))."""
    lengths = [calibration.queries[k].numel() for k in chosen]
    width = max(lengths)
    starts = torch.tensor([0] + [q.numel() for q in calibration.queries]).cumsum(0)
    recorded, reduced = [], []
    for row, (k, length) in enumerate(zip(chosen, lengths, strict=True)):
        if tokens == "last":
            picked = [length - 1]
        elif tokens == "all+first" or length == 1:
            picked = list(range(length))
        else:
            picked = list(range(1, length))
        recorded += [int(starts[k]) + j for j in picked]
        reduced += [(row, width - length + j) for j in picked]
    return torch.tensor(recorded), torch.tensor(reduced)


class _Targets:
    """Layer `layer`'s context-ful values at the fitted tokens, read when the hooks need them, in float64:
    ["y"] the block output [T, d]; [path] the outputs of an MLP input matrix [T, out]."""

    def __init__(self, states: ContextStates, layer: int, recorded: Tensor):
        self.states, self.layer, self.recorded = states, layer, recorded

    def __getitem__(self, key: str) -> Tensor:
        values = self.states.residual_sums[self.layer] if key == "y" else self.states.outputs[self.layer][key]
        return values[self.recorded.to(values.device)].double()


def _truncate(delta: LowRankUpdate, inputs: Tensor | None, ridge: float, settings: CompileSettings) -> LowRankUpdate:
    if settings.rank_fit == "data":
        return best_rank_fit(delta, inputs, ridge, settings.rank)
    return truncated(delta, settings.rank)


def _with_first(output, hidden: Tensor):
    """A layer's output with its hidden states replaced (a tensor, or Falcon's tuple)."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class _LayerFit:
    """The hooks that fit one layer's deltas during the reduced pass (module docstring, step 2).

    deltas: parameter path in the layer -> delta (float64); inputs and ridges: what each matrix fit used,
    kept for truncation after the chain."""

    def __init__(self, layer: nn.Module, spec: FamilySpec, settings: CompileSettings, targets, rows: Tensor):
        self.layer, self.spec, self.settings, self.targets = layer, spec, settings, targets
        self.rows = rows  # [T, 2] (batch row, column) of the fitted tokens in the reduced batch
        self.deltas: dict[str, Delta] = {}
        self.inputs: dict[str, Tensor] = {}
        self.ridges: dict[str, float] = {}
        self.inner: Tensor | None = None
        self.normed: tuple[Tensor, Tensor] | None = None  # the post-MLP norm's input m' and output [B, S, d]
        self.solved: tuple[Tensor, Tensor] | None = None  # (z, its ridge solve) of the input side
        self.last = False

    def register(self) -> list:
        layer, spec = self.layer, self.spec
        handles = [layer.register_forward_hook(self._output_side)]
        output_matrix = layer.get_submodule(spec.mlp_output)
        handles.append(output_matrix.register_forward_hook(self._record_inner))
        if spec.post_mlp_norm is not None:
            handles.append(layer.get_submodule(spec.post_mlp_norm).register_forward_hook(self._record_normed))
        if self.settings.input_side:
            handles += [
                layer.get_submodule(path).register_forward_hook(self._input_side(path)) for path in spec.mlp_inputs
            ]
        return handles

    def _at_rows(self, tensor: Tensor) -> Tensor:
        return tensor[self.rows[:, 0], self.rows[:, 1]].double()

    def _fit_matrix(
        self, name: str, differences: Tensor, inputs: Tensor, solved: Tensor | None = None
    ) -> LowRankUpdate:
        ridge = relative_ridge(inputs, self.settings.ridge)
        delta = ridge_update(differences, inputs, ridge, solved)
        if self.settings.rank is not None and self.settings.truncation == "chain":
            delta = _truncate(delta, inputs, ridge, self.settings)
        self.deltas[name], self.ridges[name] = delta, ridge
        if self.settings.rank is not None and self.settings.truncation == "after" and self.settings.rank_fit == "data":
            self.inputs[name] = inputs  # the data metric of the truncation after the chain
        return delta

    def _input_side(self, path: str):
        def hook(module, args, output):
            z = args[0]
            inputs = self._at_rows(z)
            if inputs.shape[0] <= inputs.shape[1] and (self.solved is None or self.solved[0] is not z):
                # gate and up read the same z: the solve on the right factor is shared
                self.solved = (z, ridge_solved(inputs, relative_ridge(inputs, self.settings.ridge)))
            differences = self.targets[path] - self._at_rows(output)  # W z_C − W z (a bias cancels)
            solved = self.solved[1] if self.solved is not None and self.solved[0] is z else None
            delta = self._fit_matrix(f"{path}.weight", differences, inputs, solved)
            return output + delta.apply(z)

        return hook

    def _record_inner(self, module, args, output):
        self.inner = args[0]

    def _record_normed(self, module, args, output):
        self.normed = (args[0], output)

    def _output_side(self, module, args, output):
        hidden = first_output(output)
        residual = self.targets["y"] - self._at_rows(hidden)  # R = y_C − y' after the input side
        output_path = self.spec.mlp_output
        if self.settings.output == "down" and self.spec.post_mlp_norm is not None:
            hidden = hidden + self._fit_through_norm(residual)
        elif self.settings.output == "down":
            delta = self._fit_matrix(f"{output_path}.weight", residual, self._at_rows(self.inner))
            hidden = hidden + delta.apply(self.inner)
        elif self.settings.output == "bias":
            shift = ridge_bias(residual, self.settings.ridge * residual.shape[0])
            self.deltas[f"{output_path}.bias"] = shift
            hidden = hidden + shift.to(hidden)
        self.inner = self.normed = None
        if self.last:
            raise StopForward
        return _with_first(output, hidden)

    def _fit_through_norm(self, residual: Tensor) -> Tensor:
        """The output side behind a post-MLP norm (module docstring, step 2): fits ΔW_out and Δs, returns
        how far they move the layer's output, [B, S, d]."""
        spec = self.spec
        norm = self.layer.get_submodule(spec.post_mlp_norm)
        mlp_output, branch = self.normed
        with onloaded(norm):
            weight = norm.weight.detach().clone()
        scale = weight.double() + spec.norm_offset
        needed = residual + self._at_rows(branch)  # T = y_C − (y' − s ⊙ n(m'))
        ridge = self.settings.ridge
        shared, moved = shared_norm_targets(
            needed,
            self._at_rows(mlp_output),
            working_norm_scale(scale, STABLE_SCALE_FLOOR),
            getattr(norm, spec.norm_eps),
            scale_ridge=ridge,
        )
        down = self._fit_matrix(
            f"{spec.mlp_output}.weight", moved - self._at_rows(mlp_output), self._at_rows(self.inner)
        )
        new_output = mlp_output + down.apply(self.inner).to(mlp_output)
        normalized = self._at_rows(normalized_by(norm, new_output, 1.0 - spec.norm_offset))
        scale_delta = shared_scale_fit(needed, normalized, shared, ridge) - scale
        self.deltas[f"{spec.post_mlp_norm}.weight"] = scale_delta
        with onloaded(norm):
            new_branch = forward_with(norm, {"weight": weight + scale_delta.to(weight)}, (new_output,))
        return new_branch - branch
