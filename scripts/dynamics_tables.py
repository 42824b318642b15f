"""The tables of docs/results/dynamics.md: the per-demonstration dynamics study, from the JSON of `implicit-icl dynamics` runs.

    for t in present_past antonym country_capital first_item associative_recall; do
        OMP_NUM_THREADS=1 implicit-icl dynamics --task $t --shots 8 --n 32 --finetune --finetune-prompts 8 \\
            --seed 0 --out out/dynamics/$t --json > out/dynamics/$t.json
    done
    .venv/bin/python scripts/dynamics_tables.py out/dynamics/*.json

Prints markdown: the answer's probability after i demonstrations; the shrinkage of the per-demonstration
increments (last / first, all layers stacked, and per layer) next to the shuffled-answer and untrained-model
controls; the fine-tuning comparison; the exactness and gradient-descent checks of each task's first prompt.
Every interval is a bootstrap 95% interval over prompts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from implicit_icl.studies.dynamics.study import CONDITIONS

SHOTS = (0, 1, 2, 4, 8)


def interval(estimate: dict, index: int | None = None, form: str = "{:.3f}") -> str:
    pick = (lambda key: estimate[key]) if index is None else (lambda key: estimate[key][index])
    return f"{form.format(pick('mean'))} [{form.format(pick('low'))}, {form.format(pick('high'))}]"


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def probability_table(results: dict[str, dict]) -> list[str]:
    shots = [i for i in SHOTS if i <= min(r["shots"] for r in results.values())]
    lines = [
        "| task | condition | "
        + " | ".join(f"i = {i}" for i in shots)
        + " | top-1 share, i = K | median rank, i = K |",
        "|---|---|" + "---|" * (len(shots) + 2),
    ]
    for task, result in results.items():
        for condition in CONDITIONS:
            data = result["per_demonstration"]["conditions"][condition]
            cells = [interval(data["answer_probability"], i) for i in shots]
            top1 = interval(data["top1"], -1, "{:.2f}")
            lines.append(f"| {task} | {condition} | {' | '.join(cells)} | {top1} | {data['median_rank'][-1]:.0f} |")
    return lines


def shrinkage_table(results: dict[str, dict]) -> list[str]:
    lines = [
        "| task | trained | shuffled answers | untrained | trained / shuffled (paired) | trained / untrained (paired) "
        "| median over layers: trained, shuffled, untrained | layers with trained/shuffled CI > 1 / < 1 "
        "| layers with trained/untrained CI > 1 / < 1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task, result in results.items():
        study = result["per_demonstration"]
        conditions, versus = study["conditions"], study["trained_vs_controls"]
        cells = [interval(conditions[c]["shrinkage_stacked"], None, "{:.2f}") for c in CONDITIONS]
        cells += [interval(versus[c]["shrinkage_ratio_stacked"], None, "{:.2f}") for c in CONDITIONS[1:]]
        cells.append(", ".join(f"{median(conditions[c]['shrinkage_per_layer']['mean']):.2f}" for c in CONDITIONS))
        for control in CONDITIONS[1:]:
            per_layer = versus[control]["shrinkage_ratio_per_layer"]
            above = sum(low > 1 for low in per_layer["low"])
            below = sum(high < 1 for high in per_layer["high"])
            cells.append(f"{above} / {below} of {len(per_layer['low'])}")
        lines.append(f"| {task} | {' | '.join(cells)} |")
    return lines


def convergence_table(results: dict[str, dict]) -> list[str]:
    """Per-demonstration increment relative to the first, all layers stacked (geometric mean)."""
    shots = min(r["shots"] for r in results.values())
    lines = ["| task | condition | " + " | ".join(f"i = {i}" for i in range(2, shots + 1)) + " |"]
    lines.append("|---|---|" + "---|" * (shots - 1))
    for task, result in results.items():
        for condition in CONDITIONS:
            relative = result["per_demonstration"]["conditions"][condition]["relative_increment"]["mean"]
            lines.append(f"| {task} | {condition} | " + " | ".join(f"{x:.2f}" for x in relative[1:shots]) + " |")
    return lines


def finetune_table(results: dict[str, dict]) -> list[str]:
    lines = [
        "| task | condition | η | cos(D_i, ΔW_i), mean over layers, i = 1 | i = K | held-out accuracy, fine-tuned, "
        "i = K | held-out accuracy, in context, i = K | p(query's answer), fine-tuned / implicit, i = K |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, result in results.items():
        finetune = result.get("finetune")
        if finetune is None:
            continue
        for condition in CONDITIONS:
            data = finetune["conditions"][condition]
            eta = finetune["step_size"]["untrained" if condition == "untrained" else "trained"]
            alignment = data["alignment_mean_over_layers"]
            probabilities = f"{data['query_probability_finetuned']['mean'][-1]:.3f} / "
            probabilities += f"{data['query_probability_implicit']['mean'][-1]:.3f}"
            lines.append(
                f"| {task} | {condition} | {eta:g} | {interval(alignment, 0, '{:+.4f}')} | "
                f"{interval(alignment, -1, '{:+.4f}')} | {interval(data['heldout_accuracy_finetuned'], -1, '{:.2f}')} | "
                f"{interval(data['heldout_accuracy_icl'], -1, '{:.2f}')} | {probabilities} |"
            )
    return lines


def exactness_table(results: dict[str, dict]) -> list[str]:
    lines = [
        "| task | prefixes (one pass) | max abs logit diff, patched vs with prefix | one-pass seconds "
        "| GD identity, max rel. error (layers with a fixed reference) | remainder share: layer 0 / median of the others |",
        "|---|---|---|---|---|---|",
    ]
    for task, result in results.items():
        fixed = [check for check in result["gradient_descent"] if check["shared_reference"]]
        identity = ", ".join(f"{c['gd_identity_max_error']:.1e} (layer {c['layer']})" for c in fixed) or "none"
        steps, remainders = result["layers"]["gradient_step_norms"], result["layers"]["remainder_norms"]
        shares = [
            sum(r / (s + r) for s, r in zip(st, rem, strict=True)) / len(st)
            for st, rem in zip(steps, remainders, strict=True)
        ]
        lines.append(
            f"| {task} | {len(result['prefix_lengths'])} | {result['max_abs_logit_diff']:.1e} | {result['seconds']:.1f} "
            f"| {identity} | {shares[0]:.1e} / {median(shares[1:]):.2f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="JSON files written by `implicit-icl dynamics --json`")
    arguments = parser.parse_args()
    results = {}
    for path in arguments.results:
        result = json.loads(path.read_text())
        results[result["task"]] = result
    first = next(iter(results.values()))
    print(f"{first['model']}; N = {first['n']} prompts per task, K = {first['shots']} shots, seed {first['seed']}.\n")
    sections = (
        (
            "Probability of the right answer after i demonstrations (patched query = in-context learning)",
            probability_table,
        ),
        ("Per-demonstration increment, last / first (geometric mean over prompts)", shrinkage_table),
        ("Per-demonstration increment relative to the first, all layers stacked (geometric mean)", convergence_table),
        ("Online SGD on the MLP input matrices vs the implicit update", finetune_table),
        ("Exactness and the gradient-descent view (each task's first prompt, every token prefix)", exactness_table),
    )
    for title, table in sections:
        print(f"### {title}\n")
        print("\n".join(table(results)) + "\n")


if __name__ == "__main__":
    main()
