"""How the demo shows what it computed: the terminal (rich tables) and out/index.html with its figures."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from implicit_icl.report import Curve, plot_curves, write_json
from implicit_icl.report.pages import Page
from implicit_icl.studies.evaluate.report import print_evaluation, write_evaluation_report

SIDES = {"with_context": "with the context", "query_alone": "query alone", "patched": "query alone + patch"}


def verdict(result: dict) -> str:
    """What the three next-token predictions show, in one sentence, from the computed tokens."""
    top = {side: result["top_tokens"][side][0] for side in SIDES}
    said = {
        side: f"{top[side]['token']!r} (p = {top[side]['probability']:.2f}, "
        f"{'right' if top[side]['id'] == result['answer_token'] else 'wrong'})"
        for side in SIDES
    }
    same = top["patched"]["id"] == top["with_context"]["id"]
    return (
        f"The query alone under the patch says {said['patched']}: "
        f"{'the same token as' if same else 'NOT the same token as'} with the context, {said['with_context']}. "
        f"The query alone without the patch says {said['query_alone']}."
    )


def print_demo(console: Console, result: dict, out: Path) -> None:
    """The demo for people: prompt, patch check, per-layer table, next tokens, generation, evaluation."""
    console.print(f"[bold]{result['model']}[/bold]: a 5-shot prompt, and its exact weight patch\n")
    console.print(result["prompt"], markup=False, highlight=False)
    console.print(
        f"\npatched without the context vs with it: max |logit difference| {result['max_abs_logit_diff']:.2e} "
        f"(without the patch: {result['baseline_max_abs_logit_diff']:.2f}); top-1 match: {result['top1_match']}"
    )
    header, rows = result["layers"]
    table = Table(title="what the patch changes, per layer (Frobenius norms)")
    for column in header:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row[0]), *(f"{value:.3g}" for value in row[1:-1]), f"{row[-1]:.1e}")
    console.print(table)
    console.print(top_tokens_table(result))
    console.print(verdict(result), markup=False, highlight=False)
    generation = result["generation"]
    console.print(f"\ngreedy, {generation['new_tokens']} new tokens (agreement {generation['agreement']:.2f}):")
    for side, label in SIDES.items():
        console.print(f"  {label:>20}: {generation[side]!r}", markup=False, highlight=False)
    print_evaluation(console, result["evaluation"])
    console.print(f"report: {out / 'index.html'} ({result['seconds']:.0f} s)")


def top_tokens_table(result: dict) -> Table:
    table = Table(title="next token: top 5 with probabilities")
    table.add_column("rank", justify="right")
    for label in SIDES.values():
        table.add_column(label)
    top = result["top_tokens"]
    for rank in range(len(top["with_context"])):
        cells = [f"{top[side][rank]['token']!r}  {top[side][rank]['probability']:.3f}" for side in SIDES]
        table.add_row(str(rank + 1), *cells)
    return table


def write_demo_report(out: Path, result: dict) -> Path:
    """out/index.html with the figures, out/metrics.json; the evaluation's own report in out/evaluation/."""
    layer_figures(out, result["layers"])
    write_evaluation_report(out / "evaluation", result["evaluation"])
    write_json(out / "metrics.json", result)
    page = Page(f"implicit-icl demo: {result['model']}")
    prompt_sections(page, result)
    layer_section(page, result["layers"])
    generation_section(page, result["generation"])
    evaluation_section(page, result["evaluation"])
    return page.write(out)


def layer_figures(out: Path, layers_table: tuple[list[str], list[list[object]]]) -> None:
    """patch_norms.png|svg (‖ΔW‖ per layer and matrix) and layer_differences.png|svg."""
    header, rows = layers_table
    layers = [row[0] for row in rows]
    curves = [Curve(name, layers, [row[1 + i] for row in rows], style="o-") for i, name in enumerate(header[1:-1])]
    plot_curves(out / "patch_norms", curves, "layer", "Frobenius norm of ΔW", "the patch, per layer", log_y=True)
    diffs = [Curve("max |patched − with context|", layers, [max(row[-1], 1e-30) for row in rows], style="o-")]
    plot_curves(out / "layer_differences", diffs, "layer", "max abs difference", "layer outputs", log_y=True)


def prompt_sections(page: Page, result: dict) -> None:
    page.paragraph(
        "A 5-shot prompt turned into an exact weight patch: the query alone, at its original positions, run "
        "through the model with every layer's MLP matrices changed by a rank-1 update (ΔW = u vᵀ), gives what the "
        "model gives after the whole prompt. Everything below was computed in this run "
        f"({result['seconds']:.0f} s; patch arithmetic {result['patch_arithmetic']}, model float32)."
    )
    page.heading("The prompt")
    page.preformatted(result["prompt"])
    page.paragraph(
        f"Patched without the context vs with it, at the last query token: max |logit difference| "
        f"{result['max_abs_logit_diff']:.2e} over all {result['vocabulary']} vocabulary "
        f"logits; without the patch the query alone differs by {result['baseline_max_abs_logit_diff']:.2f}."
    )
    top = result["top_tokens"]
    page.heading("The next token, three ways")
    page.table(
        ["rank", *SIDES.values()],
        [
            [rank + 1, *(f"{top[side][rank]['token']!r}  {top[side][rank]['probability']:.3f}" for side in SIDES)]
            for rank in range(len(top["with_context"]))
        ],
        f"The next token's top {len(top['with_context'])}, with probabilities, on this one prompt: "
        + verdict(result)
        + " (The query alone starts at position 0; RoPE makes its own attention independent of that offset.)",
    )


def layer_section(page: Page, layers_table: tuple[list[str], list[list[object]]]) -> None:
    header, rows = layers_table
    page.heading("What the patch changes, layer by layer")
    page.figure("patch_norms.png", "Frobenius norm of each layer's ΔW on the MLP matrices (from the rank-1 factors).")
    page.figure(
        "layer_differences.png",
        "Per layer, the largest |patched − with context| difference of the layer output at the query's last token "
        "(float rounding).",
    )
    page.table(header, rows, "Per layer: ‖ΔW‖ of each changed matrix and the largest difference of its output.")


def generation_section(page: Page, generation: dict) -> None:
    page.heading("Greedy generation")
    page.table(
        ["", "greedy continuation"],
        [[label, repr(generation[side])] for side, label in SIDES.items()],
        f"Greedy generation of the next tokens; the patched side feeds each new token alone under its own exact "
        f"patch. Agreement with the context: {generation['agreement']:.2f} of the tokens.",
    )


def evaluation_section(page: Page, evaluation: dict) -> None:
    page.heading("A short evaluation")
    page.table(
        ["task", "zero-shot", "ICL", "patched", "patched = ICL top-1", "max |Δlogit|"],
        [
            [
                t["task"],
                *(f"{t[f'{s}_accuracy']:.2f}" for s in ("zero_shot", "icl", "patched")),
                f"{t['patched_agreement']:.3f}",
                t["max_abs_logit_diff"],
            ]
            for t in evaluation["tasks"]
        ],
        f"Short evaluation: first-token accuracy on {evaluation['n']} prompts per task, {evaluation['shots']} shots, "
        f"seed {evaluation['seed']}; bootstrap intervals and examples in evaluation/index.html.",
    )
    page.figure(
        "evaluation/accuracy.png",
        f"First-token accuracy per task, {evaluation['n']} prompts each, bootstrap 95% intervals: zero-shot, ICL, "
        "and the query alone under its exact patch.",
    )
