"""The figures and index.html of `implicit-icl dynamics` (studies/dynamics/run.py builds the result dict):
the heat map of increment norms (layer × prefix), the per-token and per-demonstration convergence curves with
the controls, the answer's probability over the shots, the gradient-descent split and the fine-tuning comparison.
"""

from __future__ import annotations

from pathlib import Path

import torch

from implicit_icl.report import Curve, ReportFigure, plot_curves, plot_heatmap, write_json, write_report

STYLES = {"trained": "-", "shuffled answers": "--", "untrained": ":"}


def _array(rows: list[list[float | None]]) -> torch.Tensor:
    """A JSON matrix back as float64, None (NaN in the result) as NaN."""
    return torch.tensor([[torch.nan if value is None else value for value in row] for row in rows], dtype=torch.float64)


def write_dynamics_report(out: Path, result: dict) -> Path:
    """out/index.html with the figures, out/dynamics.json with everything (`result` JSON-safe already)."""
    out = Path(out)
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
    if result["gradient_descent"]:  # empty for mixtures of experts
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
    increments = _array(result["layers"]["increment_norms"]).nan_to_num(0)
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
    steps = _array(result["layers"]["gradient_step_norms"])
    remainders = _array(result["layers"]["remainder_norms"])
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
    styles = STYLES
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
    styles = STYLES
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
