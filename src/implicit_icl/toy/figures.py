"""The study's figures, each with a caption that says what it shows and on how many prompts."""

from __future__ import annotations

from pathlib import Path

from implicit_icl.report import Curve, ReportFigure, plot_curves
from implicit_icl.statistics import Estimate, interval_text


def _curve(label: str, x: list[float], estimate: Estimate, style: str = "-", band: bool = True) -> Curve:
    if not band:
        return Curve(label, x, estimate.mean.tolist(), style=style)
    return Curve(label, x, estimate.mean.tolist(), estimate.low.tolist(), estimate.high.tolist(), style)


def training_figure(
    out: Path, train_loss: list[float], least_squares_floor: float, full_context_share: float
) -> ReportFigure:
    window = max(1, len(train_loss) // 100)
    smoothed = [sum(train_loss[i : i + window]) / window for i in range(0, len(train_loss) - window + 1, window)]
    steps = [i + window for i in range(0, len(train_loss) - window + 1, window)]
    floor = Curve(
        "least-squares floor of this objective", [steps[0], steps[-1]], [least_squares_floor] * 2, style="k--"
    )
    plot_curves(
        out / "training",
        [Curve(f"training loss (mean of {window} steps)", steps, smoothed), floor],
        "Adam step",
        "squared error of y_q",
        "Training",
        log_y=True,
    )
    return ReportFigure(
        "training.png",
        f"Training loss over Adam steps (fresh prompts every step; k = N examples for a share "
        f"{full_context_share:g} of them, k uniform in 1..N for the rest). It must stay above the dashed least-squares floor of the same objective; below it would mean "
        "the label of the query leaks into the prediction.",
    )


def agreement_figure(out: Path, rows: list[dict], n_prompts: int) -> ReportFigure:
    steps = [row["step"] for row in rows]
    curves = [
        Curve("T_W(C, x): with the prompt", steps, [row["loss_with_prompt"] for row in rows], style="o-"),
        Curve("T_{W+ΔW}(x): query alone, patched", steps, [row["loss_patched"] for row in rows], style="x--"),
        Curve(
            "T_W(x): query alone, not patched", steps, [row["loss_query_alone_unpatched"] for row in rows], style=":"
        ),
    ]
    plot_curves(out / "agreement", curves, "training step", "test loss", "(a) prompt vs rank-1 patch", log_y=True)
    worst = max(row["max_rel_diff"] for row in rows)
    return ReportFigure(
        "agreement.png",
        f"(a) Test loss at every checkpoint with the full prompt and with the query alone through W + ΔW(C), on "
        f"{n_prompts} test prompts. The curves coincide: the largest relative difference of the predictions "
        f"over all checkpoints and prompts is {worst:.1e} in float64. The dotted curve, the query alone without "
        "the patch, shows what the patch carries.",
    )


def error_figure(out: Path, curves: dict[str, Estimate], checks: dict) -> ReportFigure:
    """checks: `study.learning_checks`, for the paired comparison at k = N on its own many prompts."""
    ks = list(range(len(curves["model"].mean)))
    lines = [
        _curve(name, ks, est, "k-" if name == "model" else "--", band=name == "model") for name, est in curves.items()
    ]
    plot_curves(
        out / "error_vs_k", lines, "examples in the prompt k", "error / d", "Error vs number of examples", ylim=(0, 1.3)
    )
    n = curves["model"].n_prompts
    return ReportFigure(
        "error_vs_k.png",
        f"Squared error of y_q divided by d against the number k of examples before the query, for the "
        f"trained model and the baselines (docs/experiments.md §3), mean over {n} test prompts; the band is the "
        "model's bootstrap 95% interval. The model should fall below averaging and never below least squares "
        f"(Bayes-optimal without noise). At k = N, on {checks['n_full_context_prompts']} further prompts, the "
        f"model's error/d is {checks['model_error_over_d_at_N']:.4f}; paired differences (bootstrap 95%): "
        f"model − averaging {interval_text(checks['model_minus_averaging_at_N'])}, model − one GD step "
        f"{interval_text(checks['model_minus_one_gd_step_at_N'])}.",
    )


def increments_figure(out: Path, increments: dict[str, Estimate]) -> ReportFigure:
    x = list(range(1, len(increments["trained"].mean) + 1))
    plot_curves(
        out / "increments",
        [_curve(name, x, est) for name, est in increments.items()],
        "context tokens consumed i",
        "||ΔW_i − ΔW_{i−1}||_F",
        "(b) Convergence of the implicit dynamics",
        log_y=True,
    )
    n = increments["trained"].n_prompts
    return ReportFigure(
        "increments.png",
        f"(b) Norm of the increments of the implicit update as the context is consumed one token at a time, "
        f"mean over {n} test prompts with bootstrap 95% bands, for the trained model and the two negative "
        "controls: the same model before training and the trained model on prompts with shuffled labels. "
        "A decrease that the controls show as well is a property of attention averaging over more tokens, "
        "not of what training learned.",
    )


def finetune_figure(
    out: Path, implicit: Estimate, finetuned: Estimate, step_size: float, grid: list[float]
) -> ReportFigure:
    x = list(range(1, len(implicit.mean) + 1))
    lines = [_curve("implicit: T_{W+ΔW_i}(x_q)", x, implicit), _curve(f"SGD on W, η = {step_size:g}", x, finetuned)]
    plot_curves(
        out / "finetune",
        lines,
        "examples used i",
        "test loss on x_q alone",
        "(c) Implicit update vs fine-tuning",
        log_y=True,
    )
    return ReportFigure(
        "finetune.png",
        f"(c) Test loss of the query alone after the implicit update of the first i examples, and after "
        f"explicit online SGD on W (one step per example, example j fed alone as [x_j; 0] with target y_j), "
        f"mean over {implicit.n_prompts} test prompts with bootstrap 95% bands. The SGD step size η = "
        f"{step_size:g} is the one of the grid {grid} with the lowest loss averaged over i on separate held-out tasks.",
    )


def alignment_figure(out: Path, alignment: dict[str, Estimate]) -> ReportFigure:
    x = list(range(1, len(alignment["trained"].mean) + 1))
    plot_curves(
        out / "alignment",
        [_curve(name, x, est) for name, est in alignment.items()],
        "examples used i",
        "<ΔW_i, D_i>_F / (||ΔW_i|| ||D_i||)",
        "(d) Alignment of implicit and SGD updates",
    )
    return ReportFigure(
        "alignment.png",
        f"(d) Normalised Frobenius inner product between the implicit update ΔW_i and the SGD update D_i, mean "
        f"over {alignment['trained'].n_prompts} test prompts with bootstrap 95% bands, next to the negative "
        "controls (untrained model; shuffled labels). Read the gap to the controls, not the raw value.",
    )
