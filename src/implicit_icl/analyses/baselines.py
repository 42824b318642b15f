"""Two published ways of turning demonstrations into something added to a model, for comparison with compiled
patches (docs/theory.md §7): task vectors [TV] and function vectors [FV], both acting on the last token.

Task vector (Hendel, Geva, Globerson 2023, arXiv 2310.15916): run the demonstrations followed by a dummy
query; the last token's residual state entering layer L is the task vector θ_L. In a run of a new query
without demonstrations, the last token's state entering layer L is overwritten with θ_L. L is the layer with
the best accuracy on dev queries (ties: the higher mean log-probability of the answers).

Function vector (Todd et al. 2024, arXiv 2310.15213): each attention head's output at the last token (its
slice of the input of the attention's output matrix, then that matrix's columns for the head), averaged over
in-context prompts of the task: ā_{l,h}. Heads are ranked by their causal indirect effect: in prompts whose
demonstrations have shuffled labels, replace the head's output at the last token by ā_{l,h} and measure the
gain in the correct answer's probability, averaged over prompts. The function vector is the sum of the
top-k heads' mean outputs mapped into the residual stream (through a post-attention norm where the family
has one, linearised at the layer's mean output), added to the last token's state entering layer ℓ of a run
without demonstrations; k and ℓ are chosen on dev queries.

Both are fitted here from one context (the demonstrations compiled patches see) and the same calibration
and dev queries, so the comparison is like for like; the papers average over many demonstration sets.
The causal effects use a cache of every prompt up to its last token (`queries.ContextPrefix`), so each head
costs one token per prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from implicit_icl.engine.capture import hidden_argument, hooked, record_context, with_hidden_argument
from implicit_icl.engine.forward import ForwardInputs, model_device, run_model
from implicit_icl.engine.queries import ContextPrefix, checked_queries
from implicit_icl.engine.spec import layers_of, spec_for
from implicit_icl.errors import ImplicitICLError

ATTENTION_OUTPUT = "self_attn.o_proj"  # Llama, Mistral, Qwen, Phi-3, Gemma: the per-head outputs are its input


@dataclass(frozen=True)
class DevQueries:
    """Labelled queries for choosing layers and heads: ids [Q_i] each, the answer's first token each, and
    the offset (context length) at which the queries sit when run alone."""

    queries: tuple[Tensor, ...]
    answers: Tensor  # [N] long
    offset: int


@dataclass(frozen=True)
class DevScores:
    """Per candidate: accuracy and mean log-probability of the answers on the dev queries."""

    accuracy: float
    log_prob: float

    @classmethod
    def of(cls, logits: Tensor, answers: Tensor) -> DevScores:
        log_probs = logits.log_softmax(-1)[torch.arange(answers.numel()), answers]
        return cls(float((logits.argmax(-1) == answers).double().mean()), float(log_probs.mean()))

    @property
    def key(self) -> tuple[float, float]:
        return (self.accuracy, self.log_prob)


@contextmanager
def last_token_edit(model: PreTrainedModel, layer: int, vector: Tensor, replace: bool) -> Iterator[None]:
    """Inside the block, the last token's state entering layer `layer` is replaced by (or added to) `vector` [d]."""
    with _last_token_edits(model, [(layer, vector)], replace):
        yield


@contextmanager
def _last_token_edits(model: PreTrainedModel, edits: Sequence[tuple[int, Tensor]], replace: bool) -> Iterator[None]:
    """Edit c of `edits` (layer, vector [d]) acts on the batch rows c, c + E, c + 2E, ... (E = len(edits))."""
    layers = layers_of(model, spec_for(model))
    n_edits = len(edits)
    by_layer: dict[int, list[tuple[int, Tensor]]] = {}
    for index, (layer, vector) in enumerate(edits):
        by_layer.setdefault(layer, []).append((index, vector))

    def hook_for(layer_edits):
        def hook(module, args, kwargs):
            hidden = hidden_argument(args, kwargs).clone()
            for index, vector in layer_edits:
                rows = hidden[index::n_edits, -1]
                hidden[index::n_edits, -1] = vector.to(hidden) if replace else rows + vector.to(hidden)
            return with_hidden_argument(args, kwargs, hidden)

        return hook

    handles = [layers[layer].register_forward_pre_hook(hook_for(e), with_kwargs=True) for layer, e in by_layer.items()]
    with hooked(handles):
        yield


def dev_scores(
    model: PreTrainedModel, dev: DevQueries, edits: Sequence[tuple[int, Tensor]], replace: bool, max_rows: int = 512
) -> list[DevScores]:
    """The dev scores of each candidate edit (layer, vector) of the last token, the dev queries run alone.

    Every candidate changes only the last token, so the queries but their last tokens run once (a cache),
    and each candidate costs one token per query; candidates share passes, `max_rows` rows at a time."""
    per_pass = max(1, max_rows // len(dev.queries))
    empty = torch.zeros(0, dtype=torch.long)
    scores: list[DevScores] = []
    for first in range(0, len(edits), per_pass):
        chunk = list(edits[first : first + per_pass])
        prefix = ContextPrefix(model, empty, dev.queries, repeats=len(chunk), start=dev.offset)
        with _last_token_edits(model, chunk, replace):
            logits = prefix.last_logits().reshape(len(dev.queries), len(chunk), -1)
        scores += [DevScores.of(logits[:, c], dev.answers) for c in range(len(chunk))]
    return scores


# --- task vectors ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskVector:
    """θ (the last token's state entering `layer`, [d]) and the dev scores of every candidate layer."""

    layer: int
    vector: Tensor
    dev_scores: dict[int, DevScores] = field(default_factory=dict)

    def applied(self, model: PreTrainedModel):
        """Overwrite the last token's state entering `layer` with θ (a context manager)."""
        return last_token_edit(model, self.layer, self.vector, replace=True)

    @property
    def n_bytes(self) -> int:
        return self.vector.numel() * self.vector.element_size()


@torch.no_grad()
def last_token_states(model: PreTrainedModel, context_ids: Tensor, queries: Sequence[Tensor]) -> Tensor:
    """The last token's state entering every layer, for context + each query: [L, N, d]."""
    spec = spec_for(model)
    queries = checked_queries(model, queries, "dummy query")
    sequences = [torch.cat([context_ids, query]) for query in queries]
    full = ForwardInputs.padded(sequences, side="left").to(model_device(model))
    rows = torch.stack([torch.arange(len(queries)), torch.full((len(queries),), full.input_ids.shape[1] - 1)], -1)
    states = record_context(model, spec, full, rows)
    return torch.stack([state.float().cpu() for state in states.layer_inputs])


def task_vector(
    model: PreTrainedModel, states: Tensor, dev: DevQueries, layers: Sequence[int] | None = None
) -> TaskVector:
    """The task vector from dummy-query states [L, d] (one dummy, or a mean over several), its layer chosen
    on the dev queries among `layers` (default: every layer but the first)."""
    n_layers = states.shape[0]
    layers = list(range(1, n_layers)) if layers is None else list(layers)
    if not layers or not all(0 <= layer < n_layers for layer in layers):
        raise ImplicitICLError(f"task-vector layers must lie in [0, {n_layers}), got {layers}")
    scores = dict(zip(layers, dev_scores(model, dev, [(layer, states[layer]) for layer in layers], True), strict=True))
    best = max(layers, key=lambda layer: scores[layer].key)
    return TaskVector(best, states[best].clone(), scores)


# --- function vectors --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FunctionVector:
    """The summed residual-stream outputs of `heads` [(layer, head)], added to the last token's state entering
    `layer`; the causal indirect effect of every candidate head and the dev scores of every (k, layer) tried."""

    layer: int
    vector: Tensor
    heads: tuple[tuple[int, int], ...]
    indirect_effects: Tensor  # [L, H], NaN where not measured
    dev_scores: dict[tuple[int, int], DevScores] = field(default_factory=dict)

    def applied(self, model: PreTrainedModel):
        """Add the function vector to the last token's state entering `layer` (a context manager)."""
        return last_token_edit(model, self.layer, self.vector, replace=False)

    @property
    def n_bytes(self) -> int:
        return self.vector.numel() * self.vector.element_size()


def _attention_outputs(model: PreTrainedModel) -> list[nn.Linear]:
    layers = layers_of(model, spec_for(model))
    try:
        return [layer.get_submodule(ATTENTION_OUTPUT) for layer in layers]
    except AttributeError:
        raise ImplicitICLError(
            f"function vectors need each head's output, the input of {ATTENTION_OUTPUT}; {model.config.model_type} "
            "has no such module"
        ) from None


def _head_shape(model: PreTrainedModel) -> tuple[int, int]:
    config = model.config
    heads = config.num_attention_heads
    return heads, getattr(config, "head_dim", None) or config.hidden_size // heads


@torch.no_grad()
def mean_head_outputs(model: PreTrainedModel, context_ids: Tensor, queries: Sequence[Tensor]) -> Tensor:
    """ā: every head's output (its slice of the attention output matrix's input) at the last token, averaged
    over the prompts context + query: [L, H, head_dim]."""
    queries = checked_queries(model, queries, "query")
    full = ForwardInputs.padded([torch.cat([context_ids, q]) for q in queries], side="left").to(model_device(model))
    rows = torch.stack([torch.arange(len(queries)), torch.full((len(queries),), full.input_ids.shape[1] - 1)], -1)
    with head_outputs_recorded(model, rows) as heads:
        run_model(model, full)
    return heads().mean(0)


@contextmanager
def head_outputs_recorded(model: PreTrainedModel, rows: Tensor) -> Iterator[Callable[[], Tensor]]:
    """While the block runs a forward pass (e.g. a calibration recording), keep every head's output at rows
    [N, 2] of (sequence, position); the yielded function returns them: [N, L, H, head_dim], float32."""
    projections = _attention_outputs(model)
    n_heads, head_dim = _head_shape(model)
    outputs: list[Tensor | None] = [None] * len(projections)

    def record(index: int):
        def hook(module, args):
            inputs = args[0]
            picked = inputs[rows[:, 0].to(inputs.device), rows[:, 1].to(inputs.device)]
            outputs[index] = picked.float().cpu().reshape(-1, n_heads, head_dim)

        return hook

    def stacked() -> Tensor:
        if any(output is None for output in outputs):
            raise ImplicitICLError("no forward pass ran while head outputs were being recorded")
        return torch.stack(outputs, 1)

    with hooked([p.register_forward_pre_hook(record(i)) for i, p in enumerate(projections)]):
        yield stacked


@contextmanager
def heads_replaced(projection: nn.Linear, means: Tensor) -> Iterator[None]:
    """Inside the block, in batch row r, head r mod H's output at the last token is its mean means[h]
    ([H, head_dim]): one pass tries every head of a layer, each on its own copies of the prompts."""
    n_heads, width = means.shape

    def hook(module, args):
        inputs = args[0].clone()
        for head in range(n_heads):
            inputs[head::n_heads, -1, head * width : (head + 1) * width] = means[head].to(inputs)
        return (inputs, *args[1:])

    with hooked([projection.register_forward_pre_hook(hook)]):
        yield


@torch.no_grad()
def indirect_effects(
    model: PreTrainedModel,
    means: Tensor,
    shuffled_context_ids: Tensor,
    dev: DevQueries,
    layers: Sequence[int] | None = None,
) -> Tensor:
    """The causal indirect effect of each head of `layers` (default: all): the mean gain in the answer's
    probability when its output at the last token of a shuffled-label prompt is its mean ā: [L, H] (NaN
    for layers not measured)."""
    projections = _attention_outputs(model)
    n_layers, n_heads, _ = means.shape
    layers = range(n_layers) if layers is None else layers
    prefix = ContextPrefix(model, shuffled_context_ids, dev.queries, repeats=n_heads)  # row = prompt · H + head
    rows = torch.arange(dev.answers.numel()).repeat_interleave(n_heads)
    answers = dev.answers.repeat_interleave(n_heads)

    def answer_probability() -> Tensor:  # [prompts, heads]
        return prefix.last_logits().softmax(-1)[torch.arange(rows.numel()), answers].reshape(-1, n_heads)

    baseline = answer_probability()[:, 0]
    effects = torch.full((n_layers, n_heads), float("nan"))
    for layer in layers:
        with heads_replaced(projections[layer], means[layer]):
            effects[layer] = (answer_probability() - baseline[:, None]).mean(0)
    return effects


def head_vector(model: PreTrainedModel, means: Tensor, heads: Sequence[tuple[int, int]]) -> Tensor:
    """Σ over heads of W_O[:, head slice] ā_{l,h}: the heads' mean outputs in the residual stream, [d].

    Where a norm sits between the attention and the residual stream (Gemma 2/3, OLMo 2), each head's term is
    mapped through that norm linearised at the layer's mean attention output ō_l = W_O ā_l: multiplied by
    its scale and divided by rms(ō_l), so that all of a layer's heads together give the norm of ō_l exactly."""
    projections = _attention_outputs(model)
    head_dim = means.shape[-1]
    total = torch.zeros(projections[0].weight.shape[0])
    for layer in sorted({layer for layer, _ in heads}):
        weight = projections[layer].weight.detach().float().cpu()
        picked = [head for at, head in heads if at == layer]
        terms = sum(weight[:, head * head_dim : (head + 1) * head_dim] @ means[layer, head] for head in picked)
        total += terms * _post_attention_gain(model, layer, weight @ means[layer].flatten())
    return total


def _post_attention_gain(model: PreTrainedModel, layer: int, mean_output: Tensor) -> Tensor | float:
    """s / sqrt(mean(ō²) + ε) [d] of the layer's post-attention norm at its mean output ō [d] (without the
    projection's bias, which the recorded heads do not carry); 1 where there is no such norm."""
    spec = spec_for(model)
    if spec.post_attention_norm is None:
        return 1.0
    norm = layers_of(model, spec)[layer].get_submodule(spec.post_attention_norm)
    scale = norm.weight.detach().float().cpu() + spec.norm_offset
    return scale / (mean_output.pow(2).mean() + getattr(norm, spec.norm_eps)).sqrt()


def function_vector(
    model: PreTrainedModel,
    means: Tensor,
    effects: Tensor,
    dev: DevQueries,
    head_counts: Sequence[int] = (5, 10, 20),
    layers: Sequence[int] | None = None,
) -> FunctionVector:
    """The function vector: the top-k heads by indirect effect, added at layer ℓ; (k, ℓ) chosen on dev."""
    n_layers = means.shape[0]
    layers = list(range(n_layers)) if layers is None else list(layers)
    measured = torch.nan_to_num(effects, nan=float("-inf")).flatten()
    order = measured.argsort(descending=True)
    n_measured = int(torch.isfinite(measured).sum())
    if n_measured == 0:
        raise ImplicitICLError("no head's indirect effect was measured; give at least one candidate layer")
    n_heads = effects.shape[1]
    vectors = {}
    for k in sorted({min(k, n_measured) for k in head_counts}):
        heads = tuple((int(i) // n_heads, int(i) % n_heads) for i in order[:k])
        vectors[k] = (heads, head_vector(model, means, heads))
    candidates = [(k, layer) for k in vectors for layer in layers]
    edits = [(layer, vectors[k][1]) for k, layer in candidates]
    scores = dict(zip(candidates, dev_scores(model, dev, edits, replace=False), strict=True))
    best_k, best_layer = max(scores, key=lambda key: scores[key].key)
    heads, vector = vectors[best_k]
    return FunctionVector(best_layer, vector, heads, effects, scores)
