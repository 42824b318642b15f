"""`implicit-icl dynamics`: every prefix of a context in one pass on a real model, and with a task the
per-demonstration study, its two controls and the fine-tuning comparison; a JSON-ready dict and index.html.

Context mode (a context and a query): the trajectory of every token prefix, its per-layer series, the
gradient-descent check, the patched query's probability of a target, and the untrained model of the same
architecture on the same tokens as the control of the increments' shrinkage.

Task mode (a task and K shots): prompt 1's every token prefix as above (its query drawn from the task, its
answer the target), then N prompts at demonstration boundaries for the trained model, the shuffled-answer
prompts and the untrained model (studies/dynamics/study.py), then online SGD on the MLP input matrices next to the
implicit updates (studies/dynamics/finetune.py).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from implicit_icl.analyses.dynamics.prefixes import MEMORY_BUDGET, Trajectory, prefix_patches
from implicit_icl.analyses.dynamics.series import (
    answer_scores,
    factorised_check,
    gradient_descent_check,
    layer_series,
)
from implicit_icl.errors import ImplicitICLError
from implicit_icl.models.load import LoadedModel, load_model
from implicit_icl.models.options import ARITHMETIC_DTYPES, RunOptions, token_ids
from implicit_icl.studies.dynamics.finetune import (
    STEP_SIZES,
    choose_step_size,
    held_out_examples,
    icl_heldout,
    online_sgd,
)
from implicit_icl.studies.dynamics.report import write_dynamics_report
from implicit_icl.studies.dynamics.study import (
    demonstration_boundaries,
    estimate,
    run_conditions,
    summarize,
    untrained_model,
)
from implicit_icl.tasks import Task, encode, load_task_file, sample_prompts, task


@dataclass(frozen=True)
class DynamicsSettings:
    """What `implicit-icl dynamics` computes beyond the trajectory (task mode: shots, n, seed and the
    fine-tuning comparison; both modes: the patch arithmetic, the factorised form, the memory budget)."""

    shots: int = 8
    n: int = 1
    seed: int = 0
    arithmetic: str = "float64"
    finetune: bool = False
    finetune_prompts: int = 8  # at most n of the study's prompts
    held_out: int = 4  # held-out queries per prompt
    step_size: float | None = None  # None: chosen by the rule on separate prompts
    step_size_prompts: int = 2
    step_sizes: tuple[float, ...] = STEP_SIZES
    finetune_layers: tuple[int, ...] | None = None  # None: every layer
    factorised: bool = False
    memory_budget: int = MEMORY_BUDGET

    def __post_init__(self) -> None:
        if self.arithmetic not in ARITHMETIC_DTYPES:
            raise ImplicitICLError(f"unknown --arithmetic {self.arithmetic!r}; choose float32 or float64")
        if self.shots < 2:
            raise ImplicitICLError(
                f"--shots must be at least 2 (the shuffled-answer control needs two), got {self.shots}"
            )
        if self.n < 1:
            raise ImplicitICLError(f"--n must be at least 1, got {self.n}")


# --- the trajectory of every prefix: the JSON contract ----------------------------------------------------


def trajectory_result(
    model: PreTrainedModel,
    context: torch.Tensor,
    query: torch.Tensor,
    target: int | None,
    settings: DynamicsSettings,
) -> tuple[Trajectory, dict]:
    """Every token prefix of the context in one pass, its series and checks, as a JSON-ready dict."""
    trajectory = prefix_patches(
        model,
        context,
        query,
        dtype=ARITHMETIC_DTYPES[settings.arithmetic],
        memory_budget=settings.memory_budget,
        progress=True,
    )
    if len(trajectory.prefix_lengths) < 2:
        raise ImplicitICLError("the context needs at least one token for a trajectory")
    series = layer_series(model, trajectory)
    result = dict(
        prefix_lengths=list(trajectory.prefix_lengths),
        max_abs_logit_diff=trajectory.max_abs_logit_diff,
        seconds=trajectory.seconds,
        method=trajectory.method,
        notice=trajectory.notice,
        chunks=trajectory.chunks,
        context_tokens=int(context.numel()),
        query_tokens=int(query.numel()),
        arithmetic_dtype=settings.arithmetic,
        top1_patched=trajectory.patched_logits.argmax(-1).tolist(),
        top1_match=bool((trajectory.patched_logits.argmax(-1) == trajectory.context_logits.argmax(-1)).all()),
        layers=series.as_dict(),
        gradient_descent=gradient_descent_check(model, trajectory),
    )
    if target is not None:
        probability, rank = answer_scores(trajectory.patched_logits, target)
        result["target"] = dict(token=target, probability=probability.tolist(), rank=rank.tolist())
    if settings.factorised:
        result["factorised"] = factorised_check(model, trajectory)
    return trajectory, result


def untrained_increments(untrained: PreTrainedModel, context, query, settings: DynamicsSettings) -> list[float]:
    """The control of context mode: the same tokens through the untrained model, increments of all layers stacked."""
    dtype = ARITHMETIC_DTYPES[settings.arithmetic]
    # only the increments are read: no patched check pass
    trajectory = prefix_patches(
        untrained, context, query, dtype=dtype, verify=False, memory_budget=settings.memory_budget
    )
    return layer_series(untrained, trajectory).increment_norms.pow(2).sum(0).sqrt().tolist()


# --- the command ----------------------------------------------------------------------------------------


def run_dynamics(
    options: RunOptions,
    task_name: str | None,
    task_file: Path | None,
    target: str | None,
    target_id: int | None,
    settings: DynamicsSettings,
    out: Path | None,
) -> dict:
    """Context mode or task mode (see the module docstring); writes out/index.html and out/dynamics.json."""
    if task_name is not None and task_file is not None:
        raise ImplicitICLError("give --task or --task-file, not both")
    if task_name is None and task_file is None:
        return _context_mode(options, target, target_id, settings, out)
    given = [o for o in ("context", "context_file", "context_ids", "query", "query_ids") if getattr(options, o)]
    if given or target is not None or target_id is not None:
        raise ImplicitICLError(
            "with a task, the prompts, queries and answers come from the task; drop --context/--query/--target"
        )
    chosen = task(task_name) if task_name is not None else load_task_file(task_file, settings.shots + 1)
    return _task_mode(load_model(options.model, options.dtype), chosen, settings, out)


def _context_mode(options, target, target_id, settings, out) -> dict:
    contexts = [o for o in (options.context, options.context_file, options.context_ids) if o is not None]
    queries = [o for o in (options.query, options.query_ids) if o is not None]
    if len(contexts) != 1 or len(queries) != 1:  # before the model loads
        what = "--context, --context-file or --context-ids" if len(contexts) != 1 else "--query or --query-ids"
        raise ImplicitICLError(f"give --task, or exactly one of {what} (got {len(contexts) or len(queries)})")
    if target is not None and target_id is not None:
        raise ImplicitICLError("give --target or --target-id, not both")
    loaded, context, query = options.load()
    if target is not None:
        target_id = int(token_ids(loaded, "target", target, None, None)[0])
    _, result = trajectory_result(loaded.model, context, query, target_id, settings)
    untrained = untrained_model(loaded.model, settings.seed)
    result["controls"] = {
        "untrained_increment_norms_stacked": untrained_increments(untrained, context, query, settings)
    }
    result = _header(loaded, "context") | result
    if out is not None:
        result["report"] = str(write_dynamics_report(out, clean(result)))
    return clean(result)


def _task_mode(loaded: LoadedModel, chosen: Task, settings: DynamicsSettings, out) -> dict:
    if loaded.tokenizer is None:
        raise ImplicitICLError(f"{loaded.name} has no tokenizer, and task prompts are text; use --context-ids instead")
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = sample_prompts(chosen, settings.shots, settings.n, settings.seed)
    first = encode(tokenizer, prompts[0])
    trajectory, result = trajectory_result(model, first.context_ids, first.query_ids, first.answer_token, settings)
    untrained = untrained_model(model, settings.seed)
    keep = min(settings.finetune_prompts, settings.n) if settings.finetune else 0
    conditions, shuffled = run_conditions(model, tokenizer, prompts, settings.seed, untrained, keep, trajectory)
    result["task"] = chosen.name
    result["shots"] = settings.shots
    result["n"] = settings.n
    result["seed"] = settings.seed
    boundaries = demonstration_boundaries(tokenizer, prompts[0])
    result["first_prompt"] = dict(text=prompts[0].text, answer=prompts[0].answer_text, boundaries=boundaries)
    result["per_demonstration"] = summarize(conditions, settings.seed)
    if settings.finetune:
        result["finetune"] = finetune_comparison(loaded, untrained, chosen, prompts, shuffled, conditions, settings)
    result = _header(loaded, "task") | result
    if out is not None:
        result["report"] = str(write_dynamics_report(out, clean(result)))
    return clean(result)


def finetune_comparison(loaded, untrained, chosen: Task, prompts, shuffled, conditions, settings) -> dict:
    """Online SGD next to the implicit trajectory on the first prompts, for the three conditions; each model's
    step size by the rule (or --step-size), the shuffled control with the trained model's."""
    model, tokenizer = loaded.model, loaded.tokenizer
    count = min(settings.finetune_prompts, len(prompts))
    rng = random.Random(f"held out:{settings.seed}")
    held_out = [held_out_examples(chosen, prompt, settings.held_out, rng, settings.seed) for prompt in prompts[:count]]
    if len({len(h) for h in held_out}) != 1 or not held_out[0]:
        raise ImplicitICLError(f"task {chosen.name!r} has too few examples left for held-out queries")
    step_sizes, scores = {}, {}
    separate = sample_prompts(chosen, settings.shots, settings.step_size_prompts, settings.seed + 1)
    separate_held_out = [held_out_examples(chosen, p, settings.held_out, rng, settings.seed + 1) for p in separate]
    for name, m in (("trained", model), ("untrained", untrained)):
        if settings.step_size is not None:
            step_sizes[name], scores[name] = settings.step_size, None
        else:
            step_sizes[name], scores[name] = choose_step_size(
                m, tokenizer, separate, separate_held_out, settings.step_sizes, settings.finetune_layers
            )
    runs = {
        "trained": (model, prompts[:count], "trained"),
        "shuffled answers": (model, shuffled[:count], "trained"),
        "untrained": (untrained, prompts[:count], "untrained"),
    }
    result: dict = {
        "prompts": count,
        "held_out_queries": len(held_out[0]),
        "step_size": step_sizes,
        "step_size_scores": scores,
        "step_size_grid": list(settings.step_sizes),
        "conditions": {},
    }
    for name, (m, condition_prompts, step_from) in runs.items():
        eta = torch.full((count,), step_sizes[step_from], dtype=torch.float64)
        implicit = conditions[name].implicit[:count]
        run = online_sgd(m, tokenizer, condition_prompts, held_out, eta, settings.finetune_layers, implicit, name)
        icl_log_probability, icl_correct = icl_heldout(m, tokenizer, condition_prompts, held_out)
        seed = settings.seed
        result["conditions"][name] = {
            "layers": run.layers,
            "alignment_per_layer": estimate(run.alignment, seed),  # [L, K]
            "alignment_mean_over_layers": estimate(run.alignment.mean(1), seed),  # [K]
            "heldout_accuracy_finetuned": estimate(run.heldout_correct.double().mean(-1), seed),  # [K+1]
            "heldout_accuracy_icl": estimate(icl_correct.double().mean(-1), seed),
            "heldout_log_probability_finetuned": estimate(run.heldout_log_probability.mean(-1), seed),
            "heldout_log_probability_icl": estimate(icl_log_probability.mean(-1), seed),
            "query_probability_finetuned": estimate(run.query_log_probability.exp(), seed),
            "query_probability_implicit": estimate(conditions[name].probability[:count], seed),
        }
    return result


def _header(loaded: LoadedModel, mode: str) -> dict:
    model = loaded.model
    return dict(
        model=loaded.name,
        family=model.config.model_type,
        n_layers=model.config.num_hidden_layers,
        model_dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        mode=mode,
    )


def clean(value):
    """JSON-safe: NaN and infinities become None (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: clean(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [clean(item) for item in value]
    return value


def headline(result: dict) -> dict:
    """The numbers a person reads first (the CLI's table without --json)."""
    lines = {
        "model": result["model"],
        "prefixes": len(result["prefix_lengths"]),
        "method": result["method"],
        "max_abs_logit_diff": result["max_abs_logit_diff"],
        "seconds": result["seconds"],
    }
    if "target" in result:
        probability = result["target"]["probability"]
        lines["target probability, no context → whole context"] = f"{probability[0]:.4f} → {probability[-1]:.4f}"
    for name, condition in result.get("per_demonstration", {}).get("conditions", {}).items():
        lines[f"{name}: answer probability after K shots"] = condition["answer_probability"]["mean"][-1]
        lines[f"{name}: increment last / first"] = condition["shrinkage_stacked"]["mean"]
    for name, condition in result.get("finetune", {}).get("conditions", {}).items():
        lines[f"{name}: alignment with SGD after K"] = condition["alignment_mean_over_layers"]["mean"][-1]
    if "report" in result:
        lines["report"] = result["report"]
    return lines
