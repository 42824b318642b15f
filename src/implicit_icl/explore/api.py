"""What the explorer computes, as JSON-ready dicts: each endpoint is the library's own functions on one prompt.

- `dynamics_result`: every prefix's exact patch from one pass (`analyses.dynamics.prefixes.prefix_patches`), its
  per-layer series (`analyses.dynamics.series.layer_series`: update norms, increments, alignment) [L, P],
  and per prefix the top-k of the patched query alone, of the model with that prefix, and the answer's
  probability and rank (`answer_scores`); prefix 0 (no context) is the query alone.
- `patch_result`: the exact patch of the whole context (`engine.construct.compute_patch`), checked
  (`engine.verify.verify_patch`), its per-layer norms (`Patch.summary`), and the top-k with the context, of
  the query alone, and of the query alone under the patch (`Patch.applied`).
- `compile_result`: a task's demonstrations (or pasted ones) and calibration queries compiled into one patch
  (`analyses.compile.compile_patch`); for new queries the top-k with it, with the context (ICL) and without
  either (zero-shot), on the layouts of engine/queries.py.

`Explorer` holds the model, a lock (one computation at a time: a second request while one runs is refused
with `Busy`) and the status the page polls (what runs, which step of how many).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch
from torch import Tensor

from implicit_icl.analyses.compile import CompileSettings, compile_patch
from implicit_icl.analyses.dynamics.prefixes import prefix_patches
from implicit_icl.analyses.dynamics.series import answer_scores, layer_series
from implicit_icl.engine.construct import compute_patch
from implicit_icl.engine.forward import ForwardInputs, model_device, run_model
from implicit_icl.engine.queries import context_logits, reduced_logits
from implicit_icl.engine.verify import verify_patch
from implicit_icl.errors import ImplicitICLError
from implicit_icl.explore import inputs
from implicit_icl.models.load import LoadedModel
from implicit_icl.studies.compile.splits import split_task
from implicit_icl.tasks import format_context, format_query, task, task_names

Step = Callable[[str], None]
PROMPT_FIELDS = {"context", "query", "context_ids", "query_ids", "top_k"}


class Busy(ImplicitICLError):
    """Another computation holds the model."""


# --- small pieces ---------------------------------------------------------------------------------------


def token_text(loaded: LoadedModel, token: int) -> str:
    """How a token reads: the tokenizer's decoding, or "#id" for models without one."""
    return f"#{token}" if loaded.tokenizer is None else loaded.tokenizer.decode([token])


def top_k(loaded: LoadedModel, logits: Tensor, k: int) -> list[dict]:
    """The k most probable next tokens of logits [V] (softmax in float64): token, text, probability, logit."""
    logits = logits.detach().double().cpu()
    probabilities = logits.softmax(-1)
    values, tokens = probabilities.topk(k)
    return [
        dict(token=int(t), text=token_text(loaded, int(t)), probability=float(p), logit=float(logits[t]))
        for p, t in zip(values, tokens, strict=True)
    ]


def tokens_of(loaded: LoadedModel, ids: Tensor) -> list[dict]:
    return [dict(token=int(t), text=token_text(loaded, int(t))) for t in ids.tolist()]


@torch.no_grad()
def last_logits(model, ids: Tensor, positions: Tensor) -> Tensor:
    """The model's logits [V] at the last of ids [T] placed at positions [T] (whatever patch is applied)."""
    device = model_device(model)
    return run_model(model, ForwardInputs.plain(ids[None].to(device), positions[None].to(device)))[0, -1]


def finite(value):
    """JSON-safe: NaN and infinities become None (strict JSON has neither)."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def layer_norms(patch) -> list[dict]:
    """Per layer: its changed parameters (`Patch.summary` rows) and the root sum of their squared norms."""
    rows = patch.summary()
    layers = sorted({row["layer"] for row in rows})
    return [
        dict(
            layer=layer,
            norm=sum(row["norm"] ** 2 for row in rows if row["layer"] == layer) ** 0.5,
            parameters=[dict(name=r["parameter"], kind=r["kind"], norm=r["norm"]) for r in rows if r["layer"] == layer],
        )
        for layer in layers
    ]


# --- the endpoints ----------------------------------------------------------------------------------------


def dynamics_result(loaded: LoadedModel, payload: dict, step: Step = lambda _: None) -> dict:
    """Every prefix's patch and its series (see the module docstring). Fields: context, query (or *_ids),
    optional target (text: its first token) or target_id, top_k. Without a target the answer followed is
    the model's top-1 token after the whole context."""
    payload = inputs.check_object(payload, PROMPT_FIELDS | {"target", "target_id"})
    k = inputs.int_field(payload, "top_k", 5, 1, inputs.MAX_TOP_K)
    prompt = inputs.prompt_ids(loaded, payload)
    target = inputs.target_token(loaded, payload)
    model = loaded.model
    step("every prefix's patch in one pass")
    trajectory = prefix_patches(model, prompt.context, prompt.query, dtype=torch.float64)
    step("the per-layer series")
    series = layer_series(model, trajectory)
    step("top-k per prefix")
    answer = target if target is not None else int(trajectory.context_logits[-1].argmax())
    probability, rank = answer_scores(trajectory.patched_logits, answer)
    prefixes = range(len(trajectory.prefix_lengths))
    return finite(
        dict(
            model=loaded.name,
            n_layers=model.config.num_hidden_layers,
            context_tokens=tokens_of(loaded, prompt.context),
            query_tokens=tokens_of(loaded, prompt.query),
            prefix_lengths=list(trajectory.prefix_lengths),
            layers=dict(
                update_norms=series.update_norms.tolist(),
                increment_norms=series.increment_norms.tolist(),
                alignment=series.alignment.tolist(),
                output_norms=series.output_norms.tolist(),
            ),
            top_k=dict(
                patched=[top_k(loaded, trajectory.patched_logits[j], k) for j in prefixes],
                context=[top_k(loaded, trajectory.context_logits[j], k) for j in prefixes],
                query_alone=top_k(loaded, trajectory.context_logits[0], k),
            ),
            answer=dict(
                token=answer,
                text=token_text(loaded, answer),
                given=target is not None,
                probability=probability.tolist(),
                rank=rank.tolist(),
            ),
            max_abs_logit_diff=trajectory.max_abs_logit_diff,
            method=trajectory.method,
            seconds=trajectory.seconds,
        )
    )


def patch_result(loaded: LoadedModel, payload: dict, step: Step = lambda _: None) -> dict:
    """The whole context's exact patch, verified; per-layer norms and the three top-k lists."""
    payload = inputs.check_object(payload, PROMPT_FIELDS)
    k = inputs.int_field(payload, "top_k", 5, 1, inputs.MAX_TOP_K)
    prompt = inputs.prompt_ids(loaded, payload)
    model, n, q = loaded.model, prompt.context.numel(), prompt.query.numel()
    step("the exact patch")
    start = time.perf_counter()
    exact = compute_patch(model, prompt.context, prompt.query, dtype=torch.float64)
    seconds = time.perf_counter() - start
    step("checking it against the model with the context")
    verification = verify_patch(model, prompt.context, prompt.query, exact)
    full = torch.cat([prompt.context, prompt.query])
    with_context = last_logits(model, full, torch.arange(n + q))
    alone = last_logits(model, prompt.query, torch.arange(q))
    with exact.applied(model):
        patched = last_logits(model, prompt.query, n + torch.arange(q))
    return finite(
        dict(
            model=loaded.name,
            n_layers=model.config.num_hidden_layers,
            output_side=exact.output,
            context_tokens=tokens_of(loaded, prompt.context),
            query_tokens=tokens_of(loaded, prompt.query),
            layers=layer_norms(exact),
            verification=verification.as_dict(),
            top_k=dict(
                context=top_k(loaded, with_context, k),
                query_alone=top_k(loaded, alone, k),
                patched=top_k(loaded, patched, k),
            ),
            seconds=seconds,
        )
    )


def compilable_tasks() -> list[str]:
    """The built-in tasks a fixed context can serve (not the in-prompt bindings)."""
    return [name for name in task_names() if not task(name).query_in_context]


def compile_inputs(loaded: LoadedModel, payload: dict) -> dict:
    """The compile request's context, calibration and new queries as ids (and texts, answers for a task)."""
    if ("task" in payload) == ("demonstrations" in payload or "context_ids" in payload):
        raise ImplicitICLError(
            "give either 'task' (a built-in task) or 'demonstrations' (or 'context_ids') with 'calibration'"
        )
    if "task" in payload:
        name = inputs.text_field(payload, "task")
        if name not in compilable_tasks():
            raise ImplicitICLError(f"no compilable task called {name!r}; choose one of {', '.join(compilable_tasks())}")
        if loaded.tokenizer is None:
            raise ImplicitICLError(f"{loaded.name} has no tokenizer, and task prompts are text; paste ids instead")
        shots = inputs.int_field(payload, "shots", 5, 1, 32)
        size = inputs.int_field(payload, "calibration_size", 32, 1, inputs.MAX_CALIBRATION)
        split = split_task(task(name), shots, size, dev=1, n=inputs.MAX_QUERIES, context=0, seed=0)
        context: str | list[int] = format_context(split.demonstrations)
        calibration = [format_query(example.input) for example in split.calibration]
        if "queries" in payload:
            queries, answers = inputs.query_list(loaded, payload, "queries", inputs.MAX_QUERIES), None
        else:
            queries = [format_query(example.input) for example in split.heldout[:4]]
            answers = [example.output for example in split.heldout[:4]]
    else:
        if "calibration" not in payload:
            raise ImplicitICLError("pasted demonstrations need 'calibration': a list of queries to fit the patch on")
        context = inputs.ids_field(payload, "context_ids") if "context_ids" in payload else None
        context = context if context is not None else inputs.text_field(payload, "demonstrations")
        calibration = inputs.query_list(loaded, payload, "calibration", inputs.MAX_CALIBRATION)
        queries, answers = inputs.query_list(loaded, payload, "queries", inputs.MAX_QUERIES), None
    context_ids, ids = inputs.context_and_queries(loaded, context, [*calibration, *queries])
    return dict(
        context=context,
        context_ids=context_ids,
        calibration=ids[: len(calibration)],
        queries=ids[len(calibration) :],
        texts=queries,
        answers=answers,
    )


def compile_result(loaded: LoadedModel, payload: dict, step: Step = lambda _: None, cache: dict | None = None) -> dict:
    """A compiled patch and, per new query, its top-k beside ICL's and zero-shot (see the module docstring).

    Fields: task (+ optional shots, calibration_size, queries) or demonstrations / context_ids + calibration +
    queries; optional ridge (≥ 0, default 1), rank, top_k. cache: a dict that keeps the last compiled patch, so
    new queries on the same context and calibration cost no new fit."""
    known = {"task", "shots", "calibration_size", "demonstrations", "context_ids", "calibration", "queries"}
    payload = inputs.check_object(payload, known | {"ridge", "rank", "top_k"})
    k = inputs.int_field(payload, "top_k", 5, 1, inputs.MAX_TOP_K)
    ridge = payload.get("ridge", 1.0)
    if not isinstance(ridge, int | float) or isinstance(ridge, bool) or not 0 <= ridge <= 1e6:
        raise ImplicitICLError(f"'ridge' must be a number in 0..1e6, got {ridge!r}")
    rank = None if payload.get("rank") is None else inputs.int_field(payload, "rank", 1, 1, 4096)
    request = compile_inputs(loaded, payload)
    model, context = loaded.model, request["context_ids"]
    settings = CompileSettings(ridge=float(ridge), rank=rank)
    key = (loaded.name, tuple(context.tolist()), tuple(tuple(q.tolist()) for q in request["calibration"]), settings)
    cache = {} if cache is None else cache
    if cache.get("key") != key:
        step(f"compiling the context on {len(request['calibration'])} calibration queries")
        cache.clear()
        cache.update(key=key, patch=compile_patch(model, context, request["calibration"], settings))
    compiled = cache["patch"]
    step("the new queries: compiled, ICL and zero-shot")
    offset, queries = context.numel(), request["queries"]
    icl = context_logits(model, context, queries)
    zero_shot = reduced_logits(model, queries, offset)
    with compiled.applied(model):
        patched = reduced_logits(model, queries, offset)
    rows = [
        dict(
            query=request["texts"][i] if isinstance(request["texts"][i], str) else None,
            query_tokens=tokens_of(loaded, queries[i]),
            answer=None if request["answers"] is None else request["answers"][i],
            compiled=top_k(loaded, patched[i], k),
            icl=top_k(loaded, icl[i], k),
            zero_shot=top_k(loaded, zero_shot[i], k),
        )
        for i in range(len(queries))
    ]
    return finite(
        dict(
            model=loaded.name,
            task=payload.get("task"),
            context=request["context"] if isinstance(request["context"], str) else None,
            context_tokens=int(offset),
            calibration_queries=len(request["calibration"]),
            settings=dict(ridge=settings.ridge, rank=settings.rank, tokens=settings.tokens),
            layers=[dict(layer=row["layer"], norm=row["norm"]) for row in layer_norms(compiled)],
            queries=rows,
            top1_agreement=sum(r["compiled"][0]["token"] == r["icl"][0]["token"] for r in rows) / len(rows),
        )
    )


# --- one computation at a time ------------------------------------------------------------------------------


class Explorer:
    """The loaded model, the lock that lets one computation run at a time, and the status the page polls."""

    ENDPOINTS = ("dynamics", "patch", "compile")

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self._lock = threading.Lock()
        self._status = dict(busy=False, endpoint=None, stage=None, step=0, started=None)
        self._compiled: dict = {}

    def info(self) -> dict:
        model = self.loaded.model
        tasks = compilable_tasks() if self.loaded.tokenizer is not None else []
        return dict(
            model=self.loaded.name,
            family=model.config.model_type,
            n_layers=model.config.num_hidden_layers,
            tokenizer=self.loaded.tokenizer is not None,
            tasks=tasks,
            limits=dict(chars=inputs.MAX_CHARS, context_tokens=inputs.MAX_CONTEXT_TOKENS, top_k=inputs.MAX_TOP_K),
        )

    def status(self) -> dict:
        status = dict(self._status)
        started = status.pop("started")
        status["seconds"] = None if started is None else time.perf_counter() - started
        return status

    def run(self, endpoint: str, payload: object) -> dict:
        """Run one endpoint's computation under the lock; Busy when another one holds it."""
        if endpoint not in self.ENDPOINTS:
            raise ImplicitICLError(f"no endpoint {endpoint!r}; choose one of {', '.join(self.ENDPOINTS)}")
        if not self._lock.acquire(blocking=False):
            running = self._status["endpoint"]
            raise Busy(f"busy: the {running} computation is still running; wait for it to finish and try again")
        try:
            self._status.update(busy=True, endpoint=endpoint, stage="reading the request", step=0)
            self._status["started"] = time.perf_counter()
            if endpoint == "compile":
                return compile_result(self.loaded, payload, self._step, self._compiled)
            compute = dynamics_result if endpoint == "dynamics" else patch_result
            return compute(self.loaded, payload, self._step)
        finally:
            self._status.update(busy=False, endpoint=None, stage=None, step=0, started=None)
            self._lock.release()

    def _step(self, stage: str) -> None:
        self._status.update(stage=stage, step=self._status["step"] + 1)
