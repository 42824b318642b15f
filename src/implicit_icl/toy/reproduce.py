"""`implicit-icl reproduce` and `implicit-icl demo`: from a checkpoint (shipped or freshly trained) to a
folder with index.html, the figures as PNG and SVG, and metrics.json."""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import Tensor

from implicit_icl.progress import progress_bar
from implicit_icl.report import write_json, write_report
from implicit_icl.report.html import check_out_folder
from implicit_icl.statistics import bootstrap, interval_text
from implicit_icl.toy import figures
from implicit_icl.toy.model import ToyConfig
from implicit_icl.toy.study import (
    StudyConfig,
    checkpoint_agreement,
    dynamics,
    error_curves,
    evaluation_sets,
    exactness,
    full_context_errors,
    learning_checks,
)
from implicit_icl.toy.train import TrainConfig, TrainedModel, load_trained, save_trained, train_model

SHIPPED_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "toy_default.safetensors"
DEFAULT_MODEL = ToyConfig()
DEFAULT_TRAINING = TrainConfig()
QUICK_STUDY = StudyConfig(n_test_prompts=400, n_held_out_prompts=128)
PAIRED_AT_N = ("model_minus_averaging_at_N", "model_minus_one_gd_step_at_N")
SGD_RULE = "lowest test loss averaged over i = 1..N on held-out tasks, over the grid"


def reproduce(out: Path, quick: bool = False, seed: int = 0) -> dict:
    """--quick: the shipped checkpoint and fewer prompts; otherwise train from scratch with `seed` first."""
    start = time.perf_counter()
    check_out_folder(out)
    if quick:
        trained = load_trained(SHIPPED_CHECKPOINT)
    else:
        trained = train_model(DEFAULT_MODEL, replace(DEFAULT_TRAINING, seed=seed))
        save_trained(trained, Path(out) / "toy_model.safetensors", command=f"implicit-icl reproduce --seed {seed}")
    study = replace(QUICK_STUDY if quick else StudyConfig(), seed=seed)
    metrics = run_study(trained, study, Path(out))
    metrics["mode"] = "quick (shipped checkpoint)" if quick else "full (trained from scratch)"
    metrics["wall_time_s"] = time.perf_counter() - start
    write_json(Path(out) / "metrics.json", metrics)
    return metrics


def run_study(trained: TrainedModel, study: StudyConfig, out: Path) -> dict:
    """Every experiment on `trained`; writes the figures, index.html and metrics.json under `out`."""
    sets = evaluation_sets(trained, study)
    with progress_bar() as bar:
        stage = bar.add_task("(a) prompt vs patch at every checkpoint", total=4)
        rows = checkpoint_agreement(trained, sets.test)
        bar.update(stage, advance=1, description="error vs k, model and baselines")
        errors, full_context = error_curves(trained, sets, study), full_context_errors(trained, sets)
        bar.update(stage, advance=1, description="rank of ΔW, gradient-descent identity")
        checks = exactness(trained, sets, study)
        bar.update(stage, advance=1, description="(b)-(d) dynamics, fine-tuning, alignment, controls")
        results = dynamics(trained.final(), trained.model_at(0), sets, study)
        bar.advance(stage)
    generator = torch.Generator().manual_seed(study.seed)
    curves = {name: bootstrap(values, generator) for name, values in errors.items()}
    n_test = sets.test.size
    checks_vs_baselines = learning_checks(errors, full_context, generator)
    floor = _least_squares_floor(curves["least squares"].mean, trained.train.full_context_share) * trained.config.dim
    report_figures = [
        figures.agreement_figure(out, rows, n_test),
        figures.error_figure(out, curves, checks_vs_baselines),
        figures.increments_figure(out, results["increments"]),
        figures.finetune_figure(
            out,
            results["implicit_loss"],
            results["finetune_loss"],
            results["step_size"]["trained"],
            list(study.step_size_grid),
        ),
        figures.alignment_figure(out, results["alignment"]),
        figures.training_figure(out, trained.train_loss, floor, trained.train.full_context_share),
    ]
    alignment = {name: estimate.mean for name, estimate in results["alignment"].items()}
    metrics = {
        "icl_vs_patched_max_abs_diff": max(row["max_abs_diff"] for row in rows),
        "icl_vs_patched_max_rel_diff": max(row["max_rel_diff"] for row in rows),
        **checks,
        "final_test_loss": rows[-1]["loss_with_prompt"],
        **checks_vs_baselines,
        "n_test_prompts": n_test,
        "n_held_out_prompts": sets.held_out.size,
        "n_checkpoints": len(rows),
        "checkpoints": rows,
        "error_over_d": {"k": list(range(len(curves["model"].mean)))} | {n: e.to_dict() for n, e in curves.items()},
        "increment_norms": {name: estimate.to_dict() for name, estimate in results["increments"].items()},
        "increment_last_over_first": {
            name: (estimate.mean[-1] / estimate.mean[0]).item() for name, estimate in results["increments"].items()
        },
        "finetune": {
            "sgd_step_size": results["step_size"],
            "sgd_step_size_rule": SGD_RULE,
            "sgd_step_size_grid": list(study.step_size_grid),
            "held_out_scores": results["step_size_scores"],
            "implicit_test_loss": results["implicit_loss"].to_dict(),
            "sgd_test_loss": results["finetune_loss"].to_dict(),
        },
        "alignment": {name: estimate.to_dict() for name, estimate in results["alignment"].items()}
        | {
            "gap_to_untrained_mean": (alignment["trained"] - alignment["untrained"]).mean().item(),
            "gap_to_shuffled_mean": (alignment["trained"] - alignment["shuffled labels"]).mean().item(),
        },
        "least_squares_floor_of_training_objective": floor,
        "model_config": trained.config.to_dict(),
        "train_config": asdict(trained.train),
        "study_config": asdict(study),
    }
    write_json(out / "metrics.json", metrics)
    write_report(
        out,
        "Learning without training: the toy reproduction",
        _intro(trained, study),
        headline(metrics),
        report_figures,
    )
    return metrics


def demo(
    out: Path, n_prompts: int = 1000, n_agreement_prompts: int = 200, n_full_context_prompts: int = 20_000
) -> dict:
    """The key figures on the shipped checkpoint in seconds: exactness at every checkpoint (on the first
    `n_agreement_prompts` test prompts: float64 at 21 checkpoints is the slow part), error vs k on `n_prompts`;
    the model against the baselines at k = N on `n_full_context_prompts` more prompts."""
    check_out_folder(out)
    trained = load_trained(SHIPPED_CHECKPOINT)
    study = StudyConfig(n_test_prompts=n_prompts, n_held_out_prompts=1, n_full_context_prompts=n_full_context_prompts)
    sets = evaluation_sets(trained, study)
    rows = checkpoint_agreement(trained, sets.test.subset(slice(n_agreement_prompts)))
    errors = error_curves(trained, sets, study)
    generator = torch.Generator().manual_seed(study.seed)
    curves = {name: bootstrap(values, generator) for name, values in errors.items()}
    checks = exactness(trained, sets, study)
    checks_vs_baselines = learning_checks(errors, full_context_errors(trained, sets), generator)
    summary = {
        "test prompts (error vs k / agreement)": f"{n_prompts} / {min(n_agreement_prompts, n_prompts)}",
        "float64 max |patched − with prompt|": max(row["max_abs_diff"] for row in rows),
        "float64 max relative difference": max(row["max_rel_diff"] for row in rows),
        "float32 max relative difference": checks["icl_vs_patched_float32_max_rel_diff"],
        "σ2/σ1 of ΔW (max)": checks["rank1_sigma_ratio_max"],
        "GD identity max error": checks["gd_identity_max_abs_error"],
        "final test loss": rows[-1]["loss_with_prompt"],
        **{key.replace("_", " "): value for key, value in checks_vs_baselines.items() if not isinstance(value, dict)},
        **{key.replace("_", " "): interval_text(checks_vs_baselines[key]) for key in PAIRED_AT_N},
    }
    report_figures = [
        figures.agreement_figure(out, rows, min(n_agreement_prompts, n_prompts)),
        figures.error_figure(out, curves, checks_vs_baselines),
    ]
    write_report(
        out, "implicit-icl demo: the context as a rank-1 weight patch", _intro(trained, study), summary, report_figures
    )
    return summary


def _least_squares_floor(least_squares: Tensor, full_context_share: float) -> float:
    """The least-squares error/d of the training objective: k = N for a share of prompts, else uniform."""
    share = full_context_share
    return (share * least_squares[-1] + (1 - share) * least_squares[1:].mean()).item()


def _intro(trained: TrainedModel, study: StudyConfig) -> str:
    config = trained.config
    return (
        f"In-context linear regression with d = {config.dim}, N = {config.context_length}, noise σ = {config.noise}; "
        f"a {config.n_blocks}-block transformer ({config.n_heads} heads, MLP width {config.mlp_width}, "
        f"{'with' if config.mlp_skip else 'no'} skip around the MLP) trained for {trained.train.steps} Adam steps "
        f"(seed {trained.train.seed}). Test prompts: {study.n_test_prompts}, seed {study.seed}. ΔW is the exact "
        "rank-1 update of the first MLP matrix (Dherin et al., arXiv 2507.16003, Thm 2.2)."
    )


def headline(metrics: dict) -> dict:
    """The numbers worth a glance, for the report's table and the terminal."""
    keys = [
        "icl_vs_patched_max_abs_diff",
        "icl_vs_patched_max_rel_diff",
        "icl_vs_patched_float32_max_rel_diff",
        "rank1_sigma_ratio_max",
        "gd_identity_max_abs_error",
        "final_test_loss",
        "model_error_over_d_at_N",
        "averaging_error_over_d_at_N",
        "one_gd_step_error_over_d_at_N",
        "least_squares_error_over_d_at_N",
        "n_full_context_prompts",
        "model_below_least_squares_max",
        "model_below_least_squares_max_ci95_low",
    ]
    summary = {key: metrics[key] for key in keys if key in metrics}
    summary |= {key: interval_text(metrics[key]) for key in PAIRED_AT_N if key in metrics}
    for key in ("mode", "wall_time_s"):
        if key in metrics:
            summary[key] = metrics[key]
    summary["SGD step size (trained, untrained)"] = str(tuple(metrics["finetune"]["sgd_step_size"].values()))
    summary["alignment gap to untrained / shuffled"] = (
        f"{metrics['alignment']['gap_to_untrained_mean']:.3f} / {metrics['alignment']['gap_to_shuffled_mean']:.3f}"
    )
    return summary
