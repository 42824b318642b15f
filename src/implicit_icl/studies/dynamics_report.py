"""`implicit-icl dynamics`: every prefix of a context in one pass on a real model, and with a task the
per-demonstration study, its two controls and the fine-tuning comparison; a JSON-ready dict and index.html.

Context mode (a context and a query): the trajectory of every token prefix, its per-layer series, the
gradient-descent check, the patched query's probability of a target, and the untrained model of the same
architecture on the same tokens as the control of the increments' shrinkage.

Task mode (a task and K shots): prompt 1's every token prefix as above (its query drawn from the task, its
answer the target), then N prompts at demonstration boundaries for the trained model, the shuffled-answer
prompts and the untrained model (studies/dynamics.py), then online SGD on the MLP input matrices next to the
implicit updates (studies/dynamics_finetune.py).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from implicit_icl.errors import ImplicitICLError
from implicit_icl.hf.commands import RunOptions, token_ids
from implicit_icl.hf.dynamics import MEMORY_BUDGET, Trajectory, prefix_patches
from implicit_icl.hf.dynamics_series import (
    answer_scores,
    factorised_check,
    gradient_descent_check,
    layer_series,
)
from implicit_icl.hf.load import LoadedModel, load_model
from implicit_icl.report import Curve, ReportFigure, plot_curves, plot_heatmap, write_json, write_report
from implicit_icl.studies.dynamics import (
    demonstration_boundaries,
    estimate,
    run_conditions,
    summarize,
    untrained_model,
)
from implicit_icl.studies.dynamics_finetune import (
    STEP_SIZES,
    choose_step_size,
    held_out_examples,
    icl_heldout,
    online_sgd,
)
from implicit_icl.tasks import Task, encode, load_task_file, sample_prompts, task

ARITHMETIC = {"float32": torch.float32, "float64": torch.float64}


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
        if self.arithmetic not in ARITHMETIC:
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
        dtype=ARITHMETIC[settings.arithmetic],
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
    trajectory = prefix_patches(
        untrained, context, query, dtype=ARITHMETIC[settings.arithmetic], memory_budget=settings.memory_budget
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
        result["report"] = str(write_dynamics_report(out, result))
    return clean(result)


def _task_mode(loaded: LoadedModel, chosen: Task, settings: DynamicsSettings, out) -> dict:
    if loaded.tokenizer is None:
        raise ImplicitICLError(f"{loaded.name} has no tokenizer, and task prompts are text; use --context-ids instead")
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = sample_prompts(chosen, settings.shots, settings.n, settings.seed)
    first = encode(tokenizer, prompts[0])
    _, result = trajectory_result(model, first.context_ids, first.query_ids, first.answer_token, settings)
    untrained = untrained_model(model, settings.seed)
    keep = min(settings.finetune_prompts, settings.n) if settings.finetune else 0
    conditions, shuffled = run_conditions(model, tokenizer, prompts, settings.seed, untrained, keep)
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
        result["report"] = str(write_dynamics_report(out, result))
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


# --- the report -----------------------------------------------------------------------------------------


def write_dynamics_report(out: Path, result: dict) -> Path:
    """out/index.html with the figures, out/dynamics.json with everything."""
    out = Path(out)
    result = clean(result)
    figures = [_heatmap(out, result), _token_curves(out, result), _gradient_descent(out, result)]
    if "per_demonstration" in result:
        figures += _shot_figures(out, result)
    if "finetune" in result:
        figures += _finetune_figures(out, result)
    write_json(out / "dynamics.json", result)
    summary = {
        "model": result["model"],
        "prefixes (one pass)": len(result["prefix_lengths"]),
        "max |patched − context-ful| logit, worst prefix": result["max_abs_logit_diff"],
        "seconds (one pass)": result["seconds"],
        "method": result["method"],
    }
    gd = [c for c in result["gradient_descent"] if c["shared_reference"]]
    if gd:
        summary["GD identity, max relative error (layers with a fixed reference)"] = max(
            c["gd_identity_max_error"] for c in gd
        )
    summary["patch vs theory.rank_one_update on recorded inputs, max relative"] = max(
        c["patch_vs_theory"] for c in result["gradient_descent"]
    )
    if "per_demonstration" in result:
        for name, condition in result["per_demonstration"]["conditions"].items():
            summary[f"{name}: answer probability after 0 / K shots"] = (
                f"{condition['answer_probability']['mean'][0]:.3f} / {condition['answer_probability']['mean'][-1]:.3f}"
            )
            summary[f"{name}: increment last / first (all layers, geometric mean)"] = condition["shrinkage_stacked"][
                "mean"
            ]
    intro = (
        "The exact patch of every prefix of the context, from one forward pass (context once, one copy of the "
        "query per prefix under a custom attention mask). Increments ||ΔW_{i+1} − ΔW_i|| are computed from the "
        "factors; above the first layer they have rank 2."
    )
    return write_report(out, f"implicit dynamics — {result.get('task', 'context')}", intro, summary, figures)


def _heatmap(out: Path, result: dict) -> ReportFigure:
    plot_heatmap(
        out / "increments_heatmap",
        result["layers"]["increment_norms"],
        "prefix length (context tokens)",
        "layer",
        "||ΔW_{i+1} − ΔW_i||_F, MLP input side",
        x=result["prefix_lengths"][1:],
        colorbar="increment norm",
        marks=[b + 0.5 for b in result.get("first_prompt", {}).get("boundaries", [])[1:-1]],
    )
    return ReportFigure(
        "increments_heatmap.png",
        "Increment norms per layer (rows) and prefix length (columns) of one context, every token prefix, from "
        "one pass; log colour scale; dashed lines: demonstration boundaries (task mode).",
    )


def _token_curves(out: Path, result: dict) -> ReportFigure:
    increments = torch.tensor(result["layers"]["increment_norms"], dtype=torch.float64).nan_to_num(0)
    x = result["prefix_lengths"][1:]
    curves = [Curve("trained, all layers", x, increments.pow(2).sum(0).sqrt().tolist())]
    control = result.get("controls", {}).get("untrained_increment_norms_stacked")
    if control is not None:
        curves.append(Curve("untrained, all layers", x, control, style="--"))
    plot_curves(
        out / "token_increments", curves, "prefix length (context tokens)", "increment norm", "per token", log_y=True
    )
    return ReportFigure(
        "token_increments.png",
        "Increment norm per added context token, every layer's MLP input side stacked (one prompt).",
    )


def _gradient_descent(out: Path, result: dict) -> ReportFigure:
    steps = torch.tensor(result["layers"]["gradient_step_norms"], dtype=torch.float64)
    remainders = torch.tensor(result["layers"]["remainder_norms"], dtype=torch.float64)
    share = (remainders / (steps + remainders)).nanmean(-1)
    layers = list(range(share.numel()))
    plot_curves(
        out / "gradient_descent",
        [Curve("remainder / (gradient step + remainder)", layers, share.tolist(), style="o-")],
        "layer",
        "share of the increment",
        "§6 gradient step vs moving reference",
        ylim=(0, 1),
    )
    return ReportFigure(
        "gradient_descent.png",
        "Each increment split into the §6 online-gradient-descent step (reference of the later prefix) and the "
        "remainder the moving reference adds, mean over prefixes; zero where the query's MLP input does not "
        "move (the first layer under relative positions), where the identity holds as it is.",
    )


def _band(estimate_dict: dict, x: list, label: str, style: str = "-") -> Curve:
    return Curve(label, x, estimate_dict["mean"], estimate_dict["low"], estimate_dict["high"], style)


def _shot_figures(out: Path, result: dict) -> list[ReportFigure]:
    conditions = result["per_demonstration"]["conditions"]
    styles = {"trained": "-", "shuffled answers": "--", "untrained": ":"}
    shots = list(range(result["shots"] + 1))
    n = result["n"]
    plot_curves(
        out / "answer_probability",
        [_band(c["answer_probability"], shots, name, styles[name]) for name, c in conditions.items()],
        "demonstrations",
        "probability of the right answer",
        "patched query (= in-context learning)",
        ylim=(0, 1),
    )
    plot_curves(
        out / "shot_increments",
        [_band(c["relative_increment"], shots[1:], name, styles[name]) for name, c in conditions.items()],
        "demonstration i",
        "||ΔW_i − ΔW_{i−1}|| / first",
        "convergence, all layers stacked",
        log_y=True,
    )
    layers = list(range(result["n_layers"]))
    plot_curves(
        out / "shrinkage_per_layer",
        [_band(c["shrinkage_per_layer"], layers, name, styles[name]) for name, c in conditions.items()],
        "layer",
        "increment after last / first demonstration",
        "shrinkage per layer",
        log_y=True,
    )
    caption = f"{n} prompts of {result['task']}, {result['shots']} shots; bands: bootstrap 95% over prompts."
    return [
        ReportFigure("answer_probability.png", f"Probability of the right answer after each demonstration. {caption}"),
        ReportFigure(
            "shot_increments.png",
            f"Per-demonstration increment relative to the first (geometric mean), with the controls. {caption}",
        ),
        ReportFigure("shrinkage_per_layer.png", f"Last / first per-demonstration increment per layer. {caption}"),
    ]


def _finetune_figures(out: Path, result: dict) -> list[ReportFigure]:
    finetune = result["finetune"]
    styles = {"trained": "-", "shuffled answers": "--", "untrained": ":"}
    shots = list(range(result["shots"] + 1))
    plot_curves(
        out / "finetune_alignment",
        [_band(c["alignment_mean_over_layers"], shots[1:], n, styles[n]) for n, c in finetune["conditions"].items()],
        "demonstrations (SGD steps)",
        "cosine(D_i, ΔW_i), mean over layers",
        "explicit vs implicit update",
    )
    curves = []
    for name, condition in finetune["conditions"].items():
        curves.append(_band(condition["heldout_accuracy_finetuned"], shots, f"{name}: fine-tuned", styles[name]))
        curves.append(
            Curve(f"{name}: in context", shots, condition["heldout_accuracy_icl"]["mean"], style=styles[name] + "o")
        )
    plot_curves(out / "finetune_heldout", curves, "demonstrations", "held-out first-token accuracy", "held-out queries")
    caption = (
        f"{finetune['prompts']} prompts, {finetune['held_out_queries']} held-out queries each; SGD step sizes "
        f"{finetune['step_size']} (rule: best held-out log-probability on separate prompts)."
    )
    return [
        ReportFigure("finetune_alignment.png", f"Alignment of the SGD update with the implicit update. {caption}"),
        ReportFigure("finetune_heldout.png", f"Held-out accuracy, fine-tuned vs in context. {caption}"),
    ]


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
