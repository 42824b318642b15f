"""Every prefix of a context in one forward pass: the exact patch of c_1..c_p for each chosen p (docs/theory.md §6).

For prefixes p_1 < … < p_m of a context c and a query x of q tokens, the context's keys and values are
computed once (a cache of c_1..c_L, L = p_m), and one context-ful pass reads copies of the query after it:

    cached      c_1 … c_L
    tokens      x (copy 1)        | x (copy 2)        | … | x (copy m)
    positions   p_1 … p_1 + q − 1 | p_2 … p_2 + q − 1 | … | p_m … p_m + q − 1
    visibility  copy j sees c_1..c_{p_j} and itself causally, nothing else

so the last token of copy j is the query after the prefix p_j at its original positions (HF's own forward,
a custom [T, L + T] mask and explicit position ids; `record_context` reads it at the m last tokens). One
reduced pass (`chain_patches` on the m queries alone, query j at positions p_j..) then gives m exact
patches: entry j is the patch of prefix p_j. Prefix 0 sees no context, so its patch is zero up to rounding.

Eager attention holds heads × T × (L + T) scores, so the copies go in chunks whose attention fits a memory
budget, the longest prefixes first: before each chunk the cache is cropped to the chunk's longest prefix
(which also drops the previous chunk's copies). The context is computed once, a chunk attends only to the
prefix it needs, and memory stays O(T_chunk (p + T_chunk)) for the attention and O(m d) per layer for the
states and the factors, never m copies of the context's activations. Copies of a one-token query see only
themselves among the copies, so where the family allows it their attention is split in two (attention.py):
the scores against the cached prefix and each copy's own, half of eager's products.

Families whose attention cannot take a custom mask (ALiBi: HF builds its bias from a padding mask) go prefix
by prefix instead, with a warning and `Trajectory.method == "loop"`: the same patches, m forward passes.
The per-layer series (norms, increments, alignment, the gradient-descent view) are in analyses/dynamics/series.py.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from rich.console import Console
from rich.progress import track
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

from implicit_icl.analyses.dynamics.attention import split_for_copies
from implicit_icl.engine.apply import Patch
from implicit_icl.engine.capture import ContextStates, hooked, record_context, row_reader
from implicit_icl.engine.construct import assemble_patch, chain_patches, check_settings
from implicit_icl.engine.forward import (
    ForwardInputs,
    custom_attention_mask,
    model_attention_mask,
    model_device,
    run_model,
)
from implicit_icl.engine.growing import prefilled_cache
from implicit_icl.engine.inputs import TokenIds, checked_pair
from implicit_icl.engine.memory import keep_freed_memory
from implicit_icl.engine.spec import FamilySpec, layers_of, layers_path, spec_for
from implicit_icl.errors import ImplicitICLError
from implicit_icl.patch import Source, concatenate, concatenate_deltas

MEMORY_BUDGET = 1 << 30  # bytes for one chunk's attention (scores, mask) in the context-ful pass
# Query × key entries of one chunk's attention, whatever the memory: past it, the copies' attention over the
# chunk's longest prefix costs more than one more pass (at n = 1,024, copies of two tokens: five chunks are 2.1×
# faster than one; one-token copies, whose attention is split, come out even; benchmarks.md).
CHUNK_ENTRIES = 1 << 19
METHODS = ("auto", "one pass", "loop")


@dataclass(frozen=True)
class Trajectory:
    """The exact patches of growing prefixes of one context, for one query.

    prefix_lengths: [P] increasing numbers of context tokens p_j (0: no context).
    patch: a batched Patch whose entry j is the exact patch of prefix p_j: with it, the query alone at positions
        p_j..p_j + q − 1 gives what the model gives after c_1..c_{p_j}.
    context_logits: [P, V] the model with prefix p_j, at the last query token. patched_logits: [P, V] the query
        alone under entry j (None when not verified). Both in the model's dtype.
    mlp_inputs: per layer [P, in], what the layer's first MLP matrix reads at the last query token with prefix
        p_j (the A_j of theory.md §6 in that layer; for a mixture of experts, the router's input).
    input_side_outputs: per MLP input matrix (full parameter name) [P, out], what it gives there, W A_j (+ its
        bias), in the model's dtype (none for a mixture of experts): the series' gradient split reads W_0 A_j
        from it instead of a product with W_0.
    method: "one pass" or "loop"; notice: why the loop ran (None for one pass); chunks: context-ful passes.
    seconds: wall time of the computation.
    """

    prefix_lengths: tuple[int, ...]
    patch: Patch
    context_logits: Tensor
    patched_logits: Tensor | None
    mlp_inputs: list[Tensor]
    input_side_outputs: dict[str, Tensor]
    method: str
    notice: str | None
    chunks: int
    seconds: float

    @property
    def max_abs_logit_diff(self) -> float:
        """Patched query vs the model with the same prefix, worst over prefixes and logits (NaN: not verified)."""
        if self.patched_logits is None:
            return float("nan")
        return float((self.patched_logits.double() - self.context_logits.double()).abs().max())

    def at(self, prefix_lengths: Sequence[int]) -> Trajectory:
        """The same trajectory at some of its prefixes (e.g. every token's, read at demonstration boundaries)."""
        missing = sorted(set(prefix_lengths) - set(self.prefix_lengths))
        if missing:
            raise ImplicitICLError(f"the trajectory has no prefix of length {missing[0]}; compute it first")
        index = torch.tensor([self.prefix_lengths.index(p) for p in prefix_lengths])
        patch = replace(
            self.patch,
            deltas={name: delta[index] for name, delta in self.patch.deltas.items()},
            sources=tuple(self.patch.sources[i] for i in index.tolist()),
        )
        patched = None if self.patched_logits is None else self.patched_logits[index]
        return replace(
            self,
            prefix_lengths=tuple(prefix_lengths),
            patch=patch,
            context_logits=self.context_logits[index],
            patched_logits=patched,
            mlp_inputs=[layer[index] for layer in self.mlp_inputs],
            input_side_outputs={name: outputs[index] for name, outputs in self.input_side_outputs.items()},
        )


def prefix_patches(
    model: PreTrainedModel,
    context_ids: TokenIds,
    query_ids: TokenIds,
    prefix_lengths: Sequence[int] | None = None,
    output: str | None = None,
    dtype: torch.dtype = torch.float64,
    method: str = "auto",
    memory_budget: int = MEMORY_BUDGET,
    chunk_size: int | None = None,
    progress: bool = False,
    verify: bool = True,
) -> Trajectory:
    """The exact patch of every chosen prefix of the context for the query's last token.

    prefix_lengths: increasing numbers of context tokens in 0..n (default: every prefix, 0..n).
    output, dtype: as in `compute_patch`. method: "one pass" (custom mask, chunks of copies), "loop" (one
    context-ful pass per prefix), or "auto" (one pass where the family's attention takes a custom mask, else the
    loop with a warning). memory_budget: bytes of attention one chunk may hold; chunk_size: copies per chunk
    instead (for tests). verify: also run every query alone under its patch (`patched_logits`, the check
    against the context-ful logits); without it the trajectory costs the two passes that build the patches.
    """
    spec, output = check_settings(model, output, dtype)
    if spec.encoder:
        raise ImplicitICLError(
            f"{model.config.model_type} is a bidirectional encoder: its tokens see the context after them, so "
            "it has no growing prefixes; use a causal decoder"
        )
    context, query = checked_pair(model, context_ids, query_ids, "there are no prefixes to follow")
    prefixes = checked_prefix_lengths(prefix_lengths, context.numel())
    method, notice = resolve_method(model, method)
    if chunk_size is not None and chunk_size < 1:
        raise ImplicitICLError(f"chunk_size must be at least 1, got {chunk_size}")
    start = time.perf_counter()
    cache = None
    if method == "loop":
        groups = [[p] for p in prefixes]
    else:  # the longest prefixes first: each chunk crops the cache to its own
        groups = chunked(prefixes, query.numel(), model, memory_budget, chunk_size)[::-1]
        keep_freed_memory()  # its temporaries outgrow what glibc keeps freed by default
        cache = context_cache(model, context[: prefixes[-1]])
    tracked = groups
    if progress and len(groups) > 1:
        tracked = track(groups, description=f"prefixes ({method})", console=Console(stderr=True), transient=True)
    parts = [_group(model, spec, context, query, group, output, dtype, cache, verify) for group in tracked]
    parts = parts if cache is None else parts[::-1]
    seconds = time.perf_counter() - start
    return Trajectory(
        prefix_lengths=tuple(prefixes),
        patch=concatenate([part.patch for part in parts]),
        context_logits=_joined([part.context_logits for part in parts]),
        patched_logits=_joined([part.patched_logits for part in parts]) if verify else None,
        mlp_inputs=[_joined(layer) for layer in zip(*(part.mlp_inputs for part in parts), strict=True)],
        input_side_outputs={
            name: _joined([part.input_side_outputs[name] for part in parts]) for name in parts[0].input_side_outputs
        },
        method=method,
        notice=notice,
        chunks=len(parts),
        seconds=seconds,
    )


def _joined(tensors: Sequence[Tensor]) -> Tensor:
    """The chunks' rows in order (one chunk, the usual case: itself, not a copy)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors))


def checked_prefix_lengths(prefix_lengths: Sequence[int] | None, n: int) -> list[int]:
    """Strictly increasing prefix lengths in 0..n (default all of them), or a one-line error."""
    if prefix_lengths is None:
        return list(range(n + 1))
    prefixes = [int(p) for p in prefix_lengths]
    if not prefixes:
        raise ImplicitICLError("no prefix lengths given; give at least one (0..n context tokens)")
    if any(p < 0 or p > n for p in prefixes) or any(b <= a for a, b in zip(prefixes, prefixes[1:], strict=False)):
        raise ImplicitICLError(
            f"prefix lengths must increase strictly and lie in 0..{n} (the context's length), got {prefixes[:8]}"
        )
    return prefixes


def resolve_method(model: PreTrainedModel, method: str) -> tuple[str, str | None]:
    """("one pass" or "loop", the notice when the loop replaces the one pass)."""
    if method not in METHODS:
        raise ImplicitICLError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "loop":
        return method, None
    refusal = custom_mask_refusal(model)
    if refusal is None:
        return "one pass", None
    if method == "one pass":
        raise ImplicitICLError(f"no one-pass dynamics for this model: {refusal}; use method='loop'")
    notice = f"one pass per prefix instead of one pass for all: {refusal}"
    warnings.warn(notice, stacklevel=3)
    return "loop", notice


def custom_mask_refusal(model: PreTrainedModel) -> str | None:
    """Why the model's attention cannot take a custom visibility mask (ALiBi, an encoder), or None if it can."""
    probe = ForwardInputs(
        torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, 1, dtype=torch.bool)
    )
    try:
        custom_attention_mask(model, probe)
    except ImplicitICLError as error:
        return str(error)
    return None


# --- the one-pass layout ----------------------------------------------------------------------------------


def context_cache(model: PreTrainedModel, context: Tensor) -> DynamicCache:
    """The keys and values of the context [L] (L ≥ 0), every layer kept whole so that it can be cropped
    (the copies' masks carry any sliding window)."""
    cache = DynamicCache()
    return prefilled_cache(model, context.to(model_device(model)), cache) if context.numel() else cache


def cropped(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` cached tokens (HF's crop takes the number to drop, negated)."""
    cache.crop(length - cache.get_seq_length())


def copies_layout(copies: Sequence[tuple[int, Tensor]], cached: int) -> tuple[ForwardInputs, Tensor]:
    """Copies of queries after a cache of the context's first `cached` tokens, copy j seeing only its prefix
    and itself (see the module docstring). copies: (prefix length p_j ≤ cached, query ids [q_j]) pairs.

    Returns the inputs (batch of 1, a [1, T, cached + T] visibility mask) and rows [m, 2] = (0, last token
    of copy j)."""
    starts = torch.tensor([p for p, _ in copies])  # [m]
    sizes = torch.tensor([query.numel() for _, query in copies])
    # Token t belongs to copy owner[t], at offset t − (its copy's first index) within it.
    owner = torch.repeat_interleave(torch.arange(len(copies)), sizes)
    offsets = torch.arange(owner.numel()) - (sizes.cumsum(0) - sizes)[owner]
    sees_context = torch.arange(cached)[None, :] < starts[owner][:, None]
    own_copy = (owner[:, None] == owner[None, :]) & (offsets[:, None] >= offsets[None, :])
    ids = torch.cat([query for _, query in copies])
    visible = torch.cat([sees_context, own_copy], 1)
    rows = torch.stack([torch.zeros_like(sizes), sizes.cumsum(0) - 1], -1)
    return ForwardInputs(ids[None], (starts[owner] + offsets)[None], visible[None]), rows


def chunked(
    prefixes: list[int], query_length: int, model: PreTrainedModel, memory_budget: int, chunk_size: int | None
) -> list[list[int]]:
    """Consecutive groups of prefixes, each as many copies as fit: chunk_size copies, or the memory budget
    (at least one copy per chunk, whatever the budget)."""
    if chunk_size is not None:
        return [prefixes[i : i + chunk_size] for i in range(0, len(prefixes), chunk_size)]
    groups = fitting_groups([(p, query_length) for p in prefixes], attention_bytes_per_entry(model), memory_budget)
    return [[prefixes[i] for i in group] for group in groups]


def fitting_groups(copies: Sequence[tuple[int, int]], per_entry: int, memory_budget: int) -> list[list[int]]:
    """Indices of consecutive copies (prefix length, tokens), in increasing prefix order, grouped so that each
    group's attention — its tokens × (longest prefix + its tokens) entries — fits the memory budget and
    CHUNK_ENTRIES (at least one copy per group)."""
    most = min(CHUNK_ENTRIES, memory_budget // per_entry)
    groups: list[list[int]] = []
    tokens = 0
    for index, (prefix, size) in enumerate(copies):
        if groups and (tokens + size) * (prefix + tokens + size) <= most:
            groups[-1].append(index)
            tokens += size
        else:
            groups.append([index])
            tokens = size
    return groups


def attention_bytes_per_entry(model: PreTrainedModel) -> int:
    """Bytes per entry of the [T, L + T] attention of one pass: the scores, their softmax and the weighted
    copy per head, in the model's dtype, plus the masks (additive, boolean, the int64 position distances)."""
    config = model.config
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    itemsize = next(model.parameters()).element_size()
    return 3 * heads * itemsize + itemsize + 8 + 4


# --- one chunk: the context-ful pass, the reduced pass, both logits ----------------------------------------


@dataclass(frozen=True)
class _Part:
    patch: Patch
    context_logits: Tensor
    patched_logits: Tensor | None
    mlp_inputs: list[Tensor]
    input_side_outputs: dict[str, Tensor]


def _group(model, spec: FamilySpec, context, query, prefixes: list[int], output, dtype, cache, verify) -> _Part:
    """The patches of a group of prefixes: one pass of copies after the context's cache, cropped to the
    group's longest prefix, or without a cache one plain pass (one prefix)."""
    device = model_device(model)
    q = query.numel()
    if cache is not None:
        cropped(cache, prefixes[-1])
        full, rows = copies_layout([(p, query) for p in prefixes], prefixes[-1])
    else:
        (p,) = prefixes
        full, rows = ForwardInputs.plain(torch.cat([context[:p], query])[None]), torch.tensor([[0, p + q - 1]])
    positions = torch.tensor(prefixes)[:, None] + torch.arange(q)
    reduced = ForwardInputs.plain(query.expand(len(prefixes), q), positions).to(device)
    with _reading(model, spec, rows) as mlp_inputs, split_for_copies(model, spec, q == 1 and cache is not None):
        # On through the head at the rows only: the context-ful logits come from the same pass.
        head = rows[:, 1].to(device)
        states = record_context(model, spec, full.to(device), rows, replay=q == 1, cache=cache, head=head)
    context_logits = states.logits[0]
    if spec.experts is not None and q > 1 and len(prefixes) > 1:
        # A router is not linear in its input, so several reduced sequences cannot share one layer re-run.
        entries = [
            chain_patches(model, spec, _entry(states, j), _row(reduced, j), output, dtype, feed_context_inputs=False)
            for j in range(len(prefixes))
        ]
        deltas = {name: concatenate_deltas([entry[name] for entry in entries]) for name in entries[0]}
    else:
        deltas = chain_patches(model, spec, states, reduced, output, dtype, feed_context_inputs=q == 1)
    context_tokens, query_tokens = tuple(context.tolist()), tuple(query.tolist())
    sources = [Source(context_tokens[:p], query_tokens, tuple(range(p, p + q))) for p in prefixes]
    patch = assemble_patch(model, deltas, output, dtype, sources, None)
    mlp_inputs = mlp_inputs if spec.experts is None else [layer["input"] for layer in states.experts]
    prefix = layers_path(model, spec)
    input_side_outputs = {
        f"{prefix}.{index}.{path}.weight": layer[path]
        for index, layer in enumerate(states.outputs)
        for path in spec.mlp_inputs
    }
    patched_logits = patched_last_logits(model, patch, reduced) if verify else None
    return _Part(patch, context_logits, patched_logits, mlp_inputs, input_side_outputs)


def _entry(states: ContextStates, j: int) -> ContextStates:
    """The states of row j alone."""
    return ContextStates(
        [t[j : j + 1] for t in states.layer_inputs],
        [t[j : j + 1] for t in states.residual_sums],
        [{k: t[j : j + 1] for k, t in layer.items()} for layer in states.outputs],
        [{k: t[j : j + 1] for k, t in layer.items()} for layer in states.experts],
    )


def _row(inputs: ForwardInputs, j: int) -> ForwardInputs:
    return ForwardInputs.plain(inputs.input_ids[j : j + 1], inputs.position_ids[j : j + 1])


@contextmanager
def _reading(model: PreTrainedModel, spec: FamilySpec, rows: Tensor) -> Iterator[list[Tensor]]:
    """What the context-ful pass gives besides `record_context`'s states: each layer's MLP input at the rows
    (filled in as the pass runs; none for a mixture of experts, whose router input the states hold)."""
    layers = layers_of(model, spec)
    mlp_inputs = [None] * len(layers)
    at_positions = row_reader(rows)

    def record_input(layer: int):
        def hook(module, args):
            mlp_inputs[layer] = at_positions(args[0])

        return hook

    handles = []
    if spec.experts is None:
        for index, layer in enumerate(layers):
            matrix = layer.get_submodule(spec.mlp_inputs[0])
            handles.append(matrix.register_forward_pre_hook(record_input(index)))
    with hooked(handles):
        yield mlp_inputs


@torch.no_grad()
def last_logits(model: PreTrainedModel, inputs: ForwardInputs) -> Tensor:
    """Logits [B, V] at the last position of a batch (the head runs on that position only)."""
    return last_position_logits(model, inputs)


def last_position_logits(model: PreTrainedModel, inputs: ForwardInputs) -> Tensor:
    """`run_model` (plain, left-padded or custom-masked inputs) with the head on the last position only: [B, V].
    Differentiable (no no_grad), for fine-tuning."""
    output = model(
        input_ids=inputs.input_ids,
        position_ids=inputs.position_ids,
        attention_mask=model_attention_mask(model, inputs),
        use_cache=False,
        logits_to_keep=1,
    )
    return output.logits[:, -1]


def patched_last_logits(model: PreTrainedModel, patch: Patch, reduced: ForwardInputs) -> Tensor:
    """Logits [m, V] of the m reduced queries, query j under entry j of the batched patch (through hooks; a
    mixture of experts, whose router no hook can patch, one entry at a time in its weights)."""
    if spec_for(model).experts is None:
        with patch.applied(model):
            return last_logits(model, reduced)
    logits = []
    for entry in range(len(patch)):
        with patch[entry].applied(model):
            logits.append(last_logits(model, _row(reduced, entry)))
    return torch.cat(logits)


# --- context-ful logits of many (prefix, query) copies, for accuracy over prefixes -------------------------


@torch.no_grad()
def prefix_logits(
    model: PreTrainedModel, context: Tensor, copies: Sequence[tuple[int, Tensor]], memory_budget: int = MEMORY_BUDGET
) -> Tensor:
    """The model's logits [m, V] at the last token of each copy: query j after the prefix p_j of the context,
    in as few passes after one cached context as the memory budget allows (one plain pass per copy where
    custom masks do not apply)."""
    device = model_device(model)
    if custom_mask_refusal(model) is not None:
        plain = [ForwardInputs.plain(torch.cat([context[:p], query])[None]) for p, query in copies]
        return torch.cat([last_logits(model, inputs.to(device)) for inputs in plain])
    order = sorted(range(len(copies)), key=lambda i: copies[i][0])
    sizes = [(copies[i][0], copies[i][1].numel()) for i in order]
    groups = fitting_groups(sizes, attention_bytes_per_entry(model), memory_budget)
    keep_freed_memory()
    cache = context_cache(model, context[: sizes[-1][0]])
    spec = spec_for(model)
    logits: list[Tensor | None] = [None] * len(copies)
    for group in reversed(groups):  # the longest prefixes first, cropping the cache as they go
        chosen = [order[k] for k in group]
        longest = copies[chosen[-1]][0]
        cropped(cache, longest)
        inputs, rows = copies_layout([copies[i] for i in chosen], longest)
        with split_for_copies(model, spec, one_token=all(copies[i][1].numel() == 1 for i in chosen)):
            output = run_model(model, inputs.to(device), cache, logits_to_keep=rows[:, 1].to(device))
        for i, row in zip(chosen, output[0], strict=True):
            logits[i] = row
    return torch.stack(logits)
