"""A compiled patch side by side with task vectors, function vectors, the exact per-query patch, zero-shot and
ICL: same model, same context, same queries (docs/experiments.md §7).

One *run* is one task, one demonstration set (the context) and one seed:
- the task's inputs are split, disjointly: K demonstrations (chosen by `context`), then, from the rest
  (shuffled by `seed`), dev queries (to choose λ, tokens, rank and calibration size of the compiled patch, the
  task vector's layer, the function vector's heads and layer), held-out queries (every number reported), and
  calibration queries (unlabelled: the compiled patch's fit, the task vector's dummy queries, the function
  vector's mean head outputs);
- every method answers the held-out queries alone at the positions they have after the context (zero-shot,
  compiled, task/function vector, exact patch) or after the context (ICL); first-token accuracy, top-1
  agreement with ICL and KL(p_ICL ‖ p_method) at the answer position are kept per query, so intervals can be
  bootstrapped over queries and runs later (`compile_report`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import Tensor
from transformers import PreTrainedModel

from implicit_icl.analyses.baselines import (
    DevQueries,
    function_vector,
    head_outputs_recorded,
    indirect_effects,
    last_token_states,
    task_vector,
)
from implicit_icl.analyses.compile import Calibration, CompileSettings, bias_steers, fit_patch, record_calibration
from implicit_icl.engine.construct import compute_patches
from implicit_icl.engine.queries import context_logits, reduced_logits
from implicit_icl.errors import ImplicitICLError
from implicit_icl.patch import PatchData
from implicit_icl.studies.compile.splits import Encoded
from implicit_icl.theory import LowRankUpdate

# The compiled patch's default settings, fixed before the comparison from a pilot on four tasks left out of it
# (copy, capitalize, last_item, adjective_comparative: scripts/compile_study.py pilot), and the grid searched on
# dev queries for its best settings.
DEFAULT = CompileSettings(ridge=10.0, tokens="all")
SEARCH_RIDGES = (1.0, 10.0, 100.0)
SEARCH_TOKENS = ("all", "last")
SEARCH_RANKS = (None, 16)
BIAS_SEARCH = tuple(CompileSettings(ridge=r, tokens="last", input_side=False, output="bias") for r in (0.0, 1.0, 10.0))
ABLATIONS = {
    "compiled_input_side_only": replace(DEFAULT, output="none"),
    "compiled_output_side_only": replace(DEFAULT, input_side=False),
}
FUNCTION_VECTOR_HEADS = (5, 10, 20)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class StudySettings:
    """shots: demonstrations (K); calibration, dev, n: calibration, dev and held-out queries (shrunk for a small
    task, see `split_task`); seed: chooses the demonstrations and the rest of the split (`run_many` varies the
    demonstrations and the split apart).
    rank: when set, every compiled patch searched is truncated to it (the CLI's --rank); search: choose the
    compiled patch's settings on dev (else `compiled` is the default settings); ridge/tokens: fix those;
    search_ridges × search_tokens: the first stage's grid, on dev; search_ranks: ranks tried for its best in
    the second stage, with ¼ and ½ of the calibration queries (when `rank` is None; None: full rank);
    ablations: also fit the input side alone and the output side alone; baselines: run the task vectors,
    the function vector and the exact patches (off: the compiled patches only, for a pilot); head_layers: the
    layers whose heads' indirect effects are measured for the function vector (None: every layer)."""

    shots: int = 5
    calibration: int = 64
    dev: int = 16
    n: int = 50
    seed: int = 0
    rank: int | None = None
    ridge: float | None = None
    tokens: str | None = None
    search: bool = True
    search_ranks: tuple[int | None, ...] = (None,)
    search_ridges: tuple[float, ...] = SEARCH_RIDGES
    search_tokens: tuple[str, ...] = SEARCH_TOKENS
    ablations: bool = False
    baselines: bool = True
    head_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("shots", "calibration", "dev", "n"):
            if getattr(self, name) < 1:
                raise ImplicitICLError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        CompileSettings(ridge=self.ridge or 0.0, tokens=self.tokens or "all", rank=self.rank)  # validates

    def candidates(self) -> list[CompileSettings]:
        """The compiled patches of the first search stage, on dev (the default first): λ × tokens, at `rank`."""
        ridges = self.search_ridges if self.ridge is None else (self.ridge,)
        tokens = self.search_tokens if self.tokens is None else (self.tokens,)
        default = replace(DEFAULT, ridge=ridges[0] if self.ridge is not None else DEFAULT.ridge, rank=self.rank)
        if self.tokens is not None:
            default = replace(default, tokens=self.tokens)
        if not self.search:
            return [default]
        grid = [CompileSettings(ridge=r, tokens=t, rank=self.rank) for t in tokens for r in ridges]
        return [default] + [setting for setting in grid if setting != default]

    def second_stage(self, best: CompileSettings, n_queries: int) -> list[tuple[CompileSettings, int | None]]:
        """After the first stage, for its best: each rank of `search_ranks` (when no rank is fixed), then a
        quarter and a half of the calibration queries: (settings, number of calibration queries or None)."""
        if not self.search:
            return []
        ranks = [rank for rank in self.search_ranks if rank is not None] if self.rank is None else []
        sizes = [n_queries // fraction for fraction in (4, 2) if n_queries // fraction >= 1]
        return [(replace(best, rank=rank), None) for rank in ranks] + [(best, size) for size in sizes]


# --- one run -----------------------------------------------------------------------------------------------


@dataclass
class MethodResult:
    """One method on the held-out queries: per-query correct / agree (with ICL) / KL(p_ICL ‖ p), and costs.

    seconds: to build it for this context (the recording pass it needs included); n_bytes: its size on disk
    (tensor bytes); extra_ops: extra multiply-adds per token at inference when not merged."""

    correct: Tensor
    agree: Tensor
    kl: Tensor
    seconds: float = 0.0
    n_bytes: int | None = None
    extra_ops: int | None = None
    details: dict = field(default_factory=dict)
    patch: PatchData | None = field(default=None, repr=False)  # the compiled patch itself, kept for export

    def summary(self) -> dict:
        return dict(
            accuracy=float(self.correct.double().mean()),
            top1_agreement=float(self.agree.double().mean()),
            kl_to_icl=float(self.kl.mean()),
            seconds_to_build=self.seconds,
            bytes_on_disk=self.n_bytes,
            extra_multiply_adds_per_token=self.extra_ops,
            **self.details,
        )


def kl_divergence(reference: Tensor, other: Tensor) -> Tensor:
    """KL(p_reference ‖ p_other) per row of logits [N, V], in nats, float64: [N]."""
    log_p, log_q = reference.double().log_softmax(-1), other.double().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


class Scorer:
    """Scores logits [N, V] of the held-out (and dev) queries against the answers and ICL."""

    def __init__(self, icl: Tensor, answers: Tensor):
        self.icl, self.answers = icl, answers

    def __call__(self, logits: Tensor, **costs) -> MethodResult:
        top = logits.argmax(-1)
        return MethodResult(top == self.answers, top == self.icl.argmax(-1), kl_divergence(self.icl, logits), **costs)


def patch_bytes(patch: PatchData) -> int:
    """Bytes of the tensors a saved patch holds (patch.safetensors, without its small header)."""
    total = 0
    for delta in patch.deltas.values():
        parts = (delta.U, delta.V) if isinstance(delta, LowRankUpdate) else (delta,)
        total += sum(part.numel() * part.element_size() for part in parts)
    return total


def patch_ops(patch: PatchData) -> int:
    """Multiply-adds per token the unmerged patch adds: (out + in) · rank per matrix, out per bias."""
    total = 0
    for delta in patch.deltas.values():
        total += sum(delta.shape) * delta.rank if isinstance(delta, LowRankUpdate) else delta.shape[-1]
    return total


@dataclass(frozen=True)
class CurveSettings:
    """Points of the curves over calibration size (at full rank) and over rank (in-chain and after-the-chain
    truncation), each fitted with the default and with the dev-chosen ridge and tokens."""

    sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)


def run_split(
    model: PreTrainedModel,
    encoded: Encoded,
    settings: StudySettings,
    progress: Progress | None = None,
    curves: CurveSettings | None = None,
) -> dict:
    """Every method on one run; returns {"methods": {name: MethodResult}, "choices": {...}, "sizes": {...}}
    and, with `curves`, {"curves": {"calibration": {label: points}, "rank": {label: points}}} (a point: its x
    and the per-query correct / agree / kl lists on the held-out queries)."""
    step = progress or (lambda _: None)
    offset = encoded.context_ids.numel()
    n_dev = len(encoded.dev)
    queries = encoded.dev + encoded.heldout

    step("ICL and zero-shot")
    icl_all = context_logits(model, encoded.context_ids, queries)
    labelled = encoded.heldout_answers is not None
    answers_all = torch.cat([encoded.dev_answers, encoded.heldout_answers]) if labelled else icl_all.argmax(-1)
    dev_scorer = Scorer(icl_all[:n_dev], answers_all[:n_dev])
    scorer = Scorer(icl_all[n_dev:], answers_all[n_dev:])
    methods: dict[str, MethodResult] = {"icl": scorer(icl_all[n_dev:])}
    methods["zero_shot"] = scorer(reduced_logits(model, encoded.heldout, offset), n_bytes=0, extra_ops=0)

    step("recording the calibration queries with the context")
    start = time.perf_counter()
    last_rows = torch.tensor([[k, offset + q.numel() - 1] for k, q in enumerate(encoded.calibration)])
    with head_outputs_recorded(model, last_rows) as heads:
        calibration = record_calibration(model, encoded.context_ids, encoded.calibration)
    record_seconds = time.perf_counter() - start

    compiled, choices = _compiled_methods(
        model, calibration, queries, offset, n_dev, dev_scorer, scorer, settings, step
    )
    for result in compiled.values():
        result.seconds += record_seconds
    methods.update(compiled)

    if settings.baselines:
        dev = DevQueries(tuple(encoded.dev), answers_all[:n_dev], offset)
        methods.update(
            _vector_methods(model, calibration, heads, encoded, dev, scorer, record_seconds, choices, step, settings)
        )
        step("exact per-query patches")
        methods["exact_patch"] = _exact(model, encoded, scorer)
    result = {}
    if curves is not None:
        best = CompileSettings(**choices["compiled_settings"])
        result["curves"] = _curves(model, calibration, encoded.heldout, offset, scorer, best, curves, step)
    icl_top2 = icl_all[n_dev:].topk(2, -1).values
    sizes = dict(
        context_tokens=offset,
        calibration_size=len(encoded.calibration),
        dev_size=n_dev,
        n_heldout=len(encoded.heldout),
        labels="answers" if labelled else "icl_top1",
        icl_top2_margin=(icl_top2[:, 0] - icl_top2[:, 1]).tolist(),
    )
    return dict(methods=methods, choices=choices, sizes=sizes, **result)


def _curves(model, calibration: Calibration, heldout, offset, scorer, best, curves: CurveSettings, step) -> dict:
    """Held-out scores over calibration size and over rank, for the default and the dev-chosen settings."""

    def point(x: int, setting: CompileSettings, subset=None) -> dict:
        patch = fit_patch(model, calibration, setting, subset=subset)
        scored = scorer(_evaluate_patch(model, patch, heldout, offset))
        return dict(
            x=x, correct=scored.correct.int().tolist(), agree=scored.agree.int().tolist(), kl=scored.kl.tolist()
        )

    n_queries = len(calibration.queries)
    sizes = [size for size in curves.sizes if size < n_queries] + [n_queries]
    settings = {"default": replace(DEFAULT, rank=None), "best on dev": replace(best, rank=None)}
    result: dict[str, dict[str, list]] = {"calibration": {}, "rank": {}}
    for label, setting in settings.items():
        if label == "best on dev" and setting == settings["default"]:
            continue
        step(f"curve over calibration size: {setting.label}")
        by_size = [point(size, setting, list(range(size))) for size in sizes]
        result["calibration"][f"compiled ({label}: {setting.label})"] = by_size
        full = by_size[-1]  # every calibration query at full rank: also the rank curves' last point
        for truncation in ("chain", "after"):
            step(f"curve over rank: {setting.label}, truncation {truncation}")
            points = [point(rank, replace(setting, rank=rank, truncation=truncation)) for rank in curves.ranks]
            full_rank = max(rank for rank in curves.ranks) * 2
            result["rank"][f"{label}, {'in-chain' if truncation == 'chain' else 'after the chain'}"] = points + [
                dict(full, x=full_rank)
            ]
    return result


def _search_row(item) -> dict:
    """One searched setting: what it scored on dev (which chose) and on held-out (reported, never used to choose)."""
    setting, subset, on_dev, on_heldout, seconds = item
    row = dict(settings=setting.label, calibration_queries=on_heldout.details["calibration_queries"], seconds=seconds)
    for split, result in (("dev", on_dev), ("heldout", on_heldout)):
        row.update(
            {
                f"{split}_accuracy": float(result.correct.double().mean()),
                f"{split}_top1_agreement": float(result.agree.double().mean()),
                f"{split}_kl_to_icl": float(result.kl.mean()),
            }
        )
    return row


def _selection_key(result: MethodResult) -> tuple[float, float, float]:
    return (float(result.correct.double().mean()), float(result.agree.double().mean()), -float(result.kl.mean()))


def _evaluate_patch(model, patch, queries, offset) -> Tensor:
    with patch.applied(model, via="hooks"):  # for a few hundred tokens, cheaper than adding U V^T to W
        return reduced_logits(model, queries, offset)


def _compiled_methods(model, calibration: Calibration, queries, offset, n_dev, dev_scorer, scorer, settings, step):
    """The default compiled patch, the best on dev, the best bias-only one and the ablations."""
    results: dict[str, MethodResult] = {}
    tried: list[tuple[CompileSettings, list[int] | None, MethodResult, MethodResult, float]] = []
    kept: dict[str, object] = {"key": None, "patch": None}  # the best searched patch so far, for export

    def attempt(setting: CompileSettings, subset: list[int] | None = None, searched: bool = True):
        start = time.perf_counter()
        patch = fit_patch(model, calibration, setting, subset=subset)
        seconds = time.perf_counter() - start
        with patch.applied(model, via="hooks"):  # for a few hundred tokens, cheaper than adding U V^T to W
            on_dev_logits = reduced_logits(model, queries[:n_dev], offset)
            total = time.perf_counter() - start  # fitting and scoring on dev: the search's cost
            logits = torch.cat([on_dev_logits, reduced_logits(model, queries[n_dev:], offset)])
        costs = dict(n_bytes=patch_bytes(patch), extra_ops=patch_ops(patch))
        on_dev, on_heldout = dev_scorer(logits[:n_dev]), scorer(logits[n_dev:], seconds=seconds, **costs)
        on_heldout.details = dict(settings=setting.label, calibration_queries=len(subset or calibration.queries))
        if searched:
            tried.append((setting, subset, on_dev, on_heldout, total))
            if kept["key"] is None or _selection_key(on_dev) > kept["key"]:
                kept.update(key=_selection_key(on_dev), patch=patch)
        return on_dev, on_heldout

    candidates = settings.candidates()
    for index, setting in enumerate(candidates):
        step(f"compiled patch {index + 1}/{len(candidates)}: {setting.label}")
        attempt(setting)
    results["compiled_default"] = tried[0][3]
    best = max(tried, key=lambda item: _selection_key(item[2]))
    for setting, size in settings.second_stage(best[0], len(calibration.queries)):
        step(f"compiled patch: {setting.label}, {size or len(calibration.queries)} calibration queries")
        attempt(setting, None if size is None else list(range(size)))
    search_seconds = sum(item[4] for item in tried)
    best = max(tried, key=lambda item: _selection_key(item[2]))
    results["compiled"] = replace(best[3], seconds=search_seconds, patch=kept["patch"])
    choices = dict(
        compiled=best[3].details["settings"],
        compiled_calibration_queries=best[3].details["calibration_queries"],
        compiled_settings=asdict(best[0]),
        search=[_search_row(item) for item in tried],
    )
    if bias_steers(model):
        bias_tried = []
        for setting in BIAS_SEARCH:
            step(f"bias-only compiled patch: {setting.label}")
            bias_tried.append(attempt(setting, searched=False))
        best_bias = max(bias_tried, key=lambda item: _selection_key(item[0]))
        results["compiled_bias"] = best_bias[1]
        choices["compiled_bias"] = best_bias[1].details["settings"]
    if settings.ablations:
        for name, setting in ABLATIONS.items():
            step(f"ablation: {setting.label}")
            results[name] = attempt(replace(setting, rank=settings.rank), searched=False)[1]
    return results, choices


def _vector_methods(model, calibration, heads, encoded: Encoded, dev, scorer, record_seconds, choices, step, settings):
    """Task vectors (one dummy query, as in the paper, and the mean over all calibration queries) and the
    function vector (when a shuffled-label context exists)."""
    methods = {}
    start = time.perf_counter()
    dummy = last_token_states(model, encoded.context_ids, encoded.calibration[:1])[:, 0]  # [L, d], one pass
    dummy_seconds = time.perf_counter() - start
    candidates = (("task_vector", dummy, dummy_seconds), ("task_vector_mean", None, record_seconds))
    for name, vector_states, state_seconds in candidates:
        step(name.replace("_", " "))
        start = time.perf_counter()
        if vector_states is None:  # the mean over all calibration queries, read from their recording
            vector_states = calibration.last_token_inputs().mean(1)
        vector = task_vector(model, vector_states, dev)
        with vector.applied(model):
            logits = reduced_logits(model, encoded.heldout, dev.offset)
        seconds = time.perf_counter() - start + state_seconds
        methods[name] = scorer(logits, seconds=seconds, n_bytes=vector.n_bytes, extra_ops=0)
        choices[f"{name}_layer"] = vector.layer
    if encoded.shuffled_context_ids is None:
        return methods
    step("function vector: indirect effects of every head")
    start = time.perf_counter()
    means = heads().mean(0)
    effects = indirect_effects(model, means, encoded.shuffled_context_ids, dev, settings.head_layers)
    vector = function_vector(model, means, effects, dev, FUNCTION_VECTOR_HEADS)
    with vector.applied(model):
        logits = reduced_logits(model, encoded.heldout, dev.offset)
    seconds = time.perf_counter() - start + record_seconds
    methods["function_vector"] = scorer(logits, seconds=seconds, n_bytes=vector.n_bytes, extra_ops=0)
    choices.update(function_vector_layer=vector.layer, function_vector_heads=[list(head) for head in vector.heads])
    return methods


def _exact(model, encoded: Encoded, scorer, batch: int = 16) -> MethodResult:
    """Each held-out query under its own exact patch (computed per query from context + query)."""
    offset, rows, seconds, patch = encoded.context_ids.numel(), [], 0.0, None
    for first in range(0, len(encoded.heldout), batch):
        chunk = encoded.heldout[first : first + batch]
        start = time.perf_counter()
        patch = compute_patches(model, [(encoded.context_ids, query) for query in chunk], dtype=torch.float32)
        seconds += time.perf_counter() - start
        with patch.applied(model):
            rows.append(reduced_logits(model, chunk, offset, batch_size=len(chunk)))
    single = patch[0]
    result = scorer(torch.cat(rows), seconds=seconds / len(encoded.heldout), n_bytes=patch_bytes(single))
    result.extra_ops = patch_ops(single)
    result.details = dict(per_query=True)
    return result
