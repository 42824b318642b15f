"""`implicit-icl demo`: the exact patch of a few-shot prompt on the default model, shown every way it can be checked.

1. A built-in 5-shot prompt (present → past tense) whose query the model gets wrong alone and right in context.
2. Its exact patch (`compute_patch`), checked against the model with its context (`verify_patch`): per layer
   the norms of ΔW on the MLP matrices and how far the patched layer output is from the context-ful one.
3. The next token three ways: with the context, the query alone, the query alone under the patch.
4. Greedy generation with the context and without it under per-token patches (`patched_generate`).
5. A short evaluation over several tasks (`studies.suite`): zero-shot vs ICL vs patched.
Everything shown is computed in the run; out/index.html holds the tables and figures with captions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import PreTrainedTokenizerBase

from implicit_icl.errors import ImplicitICLError
from implicit_icl.hf.construct import compute_patch
from implicit_icl.hf.generate import patched_generate
from implicit_icl.hf.load import LoadedModel, load_model
from implicit_icl.hf.verify import verify_patch
from implicit_icl.report import Curve, plot_curves, write_json
from implicit_icl.studies.evaluate import EvaluationSettings
from implicit_icl.studies.report import Page, check_out_folder
from implicit_icl.studies.suite import print_evaluation, run_evaluation, write_evaluation_report
from implicit_icl.tasks import Example, Prompt, encode, greedy_continuations, sample_prompts, task
from implicit_icl.tasks.evaluate import next_token_logits, plain_next_tokens

DEMO_PROMPT = Prompt(
    shots=tuple(
        Example(verb, past)
        for verb, past in (("walk", "walked"), ("go", "went"), ("eat", "ate"), ("write", "wrote"), ("take", "took"))
    ),
    query=Example("speak", "spoke"),
)
EVAL_TASKS = ("present_past", "antonym", "country_capital", "associative_recall")
SIDES = {"with_context": "with the context", "query_alone": "query alone", "patched": "query alone + patch"}


@dataclass(frozen=True)
class DemoSettings:
    """eval_tasks × eval_prompts prompts of `shots` shots for the short evaluation; new_tokens to generate."""

    eval_tasks: tuple[str, ...] = EVAL_TASKS
    eval_prompts: int = 20
    shots: int = 5
    new_tokens: int = 8
    top_k: int = 5

    def __post_init__(self) -> None:  # fail before the model loads
        if self.eval_prompts < 1:
            raise ImplicitICLError(f"--eval-prompts must be at least 1, got {self.eval_prompts}")
        if not self.eval_tasks:
            raise ImplicitICLError("the demo's evaluation needs at least one task; give --eval-task NAME")
        for name in self.eval_tasks:
            sample_prompts(task(name), self.shots, 1, seed=0)
        if self.new_tokens < 1:
            raise ImplicitICLError(f"--new-tokens must be at least 1, got {self.new_tokens}")


def top_tokens(logits: torch.Tensor, tokenizer: PreTrainedTokenizerBase, k: int) -> list[dict]:
    """The k most likely next tokens of logits [V]: id, text and probability."""
    probabilities = logits.double().softmax(-1)
    values, ids = probabilities.topk(k)
    return [
        {"id": int(i), "token": tokenizer.decode([int(i)]), "probability": float(p)}
        for p, i in zip(values, ids, strict=True)
    ]


def next_token_three_ways(loaded: LoadedModel, context: torch.Tensor, query: torch.Tensor, patch, k: int) -> dict:
    """Top-k next tokens with the context, of the query alone (positions from 0) and of the query alone at its
    original positions under the patch."""
    model, tokenizer = loaded.model, loaded.tokenizer
    logits = {
        "with_context": next_token_logits(model, [torch.cat([context, query])])[0],
        "query_alone": next_token_logits(model, [query])[0],
    }
    with patch.applied(model):
        logits["patched"] = next_token_logits(model, [query], [torch.arange(len(context), len(context) + len(query))])[
            0
        ]
    return {side: top_tokens(values, tokenizer, k) for side, values in logits.items()}


def layer_rows(patch, layer_diffs: list[float]) -> tuple[list[str], list[list[object]]]:
    """Per layer: the Frobenius norm of every changed matrix, and max |patched − with context| of its output."""
    parameters = list(dict.fromkeys(row["parameter"].split(".")[-2] for row in patch.summary()))
    norms: dict[int, dict[str, float]] = {}
    for row in patch.summary():
        norms.setdefault(row["layer"], {})[row["parameter"].split(".")[-2]] = row["norm"]
    header = ["layer", *(f"‖ΔW_{name.removesuffix('_proj')}‖" for name in parameters), "max |patched − context|"]
    rows = [[layer, *(norms[layer][name] for name in parameters), layer_diffs[layer]] for layer in sorted(norms)]
    return header, rows


def run_demo(out: Path, settings: DemoSettings = DemoSettings(), loaded: LoadedModel | None = None) -> dict:
    """Compute everything, write out/index.html (+ figures, metrics.json); returns the results."""
    check_out_folder(out)
    start = time.perf_counter()
    say = Console(stderr=True, highlight=False).print
    if loaded is None:
        say("demo 1/4: loading the default model…")
        loaded = load_model()
    model, tokenizer = loaded.model, loaded.tokenizer
    encoded = encode(tokenizer, DEMO_PROMPT)
    context, query = encoded.context_ids, encoded.query_ids
    say("demo 2/4: the exact patch and its check…")
    patch = compute_patch(model, context, query)
    verification = verify_patch(model, context, query, patch)
    top = next_token_three_ways(loaded, context, query, patch, settings.top_k)
    say("demo 3/4: greedy generation with the context and patched without it…")
    generation = patched_generate(model, context, query, settings.new_tokens, progress=True)
    alone = greedy_continuations(plain_next_tokens(model), [query], [settings.new_tokens], lambda token: False)[0]
    say(f"demo 4/4: evaluation, {len(settings.eval_tasks)} tasks × {settings.eval_prompts} prompts…")
    evaluation = run_evaluation(
        None,
        "float32",
        settings.eval_tasks,
        [],
        EvaluationSettings(settings.shots, settings.eval_prompts, whole_answers=False),
        loaded=loaded,
    )
    result = {
        "model": loaded.name,
        "prompt": DEMO_PROMPT.text,
        "expected_answer": DEMO_PROMPT.answer_text,
        "answer_token": encoded.answer_token,
        "vocabulary": model.config.vocab_size,
        "context_tokens": len(context),
        "query_tokens": len(query),
        "patch_arithmetic": str(patch.dtype).removeprefix("torch."),
        **verification.as_dict(),
        "top_tokens": top,
        "layers": layer_rows(patch, verification.layer_max_abs_diffs),
        "generation": {
            "with_context": tokenizer.decode(generation.tokens_with_context),
            "patched": tokenizer.decode(generation.tokens_patched),
            "query_alone": tokenizer.decode(alone),
            "agreement": generation.agreement,
            "new_tokens": settings.new_tokens,
        },
        "evaluation": evaluation,
    }
    result["seconds"] = time.perf_counter() - start
    write_demo_report(Path(out), result)
    return result


def headline(result: dict) -> dict:
    """The numbers `--json` prints."""
    top = {side: result["top_tokens"][side][0] for side in SIDES}
    return {
        "model": result["model"],
        "prompt": result["prompt"],
        "expected_answer": result["expected_answer"],
        **{f"{side}_top_token": top[side]["token"] for side in SIDES},
        **{f"{side}_top_probability": top[side]["probability"] for side in SIDES},
        "max_abs_logit_diff": result["max_abs_logit_diff"],
        "baseline_max_abs_logit_diff": result["baseline_max_abs_logit_diff"],
        "top1_match": result["top1_match"],
        "generation_with_context": result["generation"]["with_context"],
        "generation_patched": result["generation"]["patched"],
        "generation_agreement": result["generation"]["agreement"],
        "evaluation": {
            t["task"]: {side: t[f"{side}_accuracy"] for side in ("zero_shot", "icl", "patched")}
            for t in result["evaluation"]["tasks"]
        },
        "evaluation_prompts_per_task": result["evaluation"]["n"],
        "seconds": result["seconds"],
    }


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
    header, rows = result["layers"]
    layers = [row[0] for row in rows]
    curves = [Curve(name, layers, [row[1 + i] for row in rows], style="o-") for i, name in enumerate(header[1:-1])]
    plot_curves(out / "patch_norms", curves, "layer", "Frobenius norm of ΔW", "the patch, per layer", log_y=True)
    diffs = [Curve("max |patched − with context|", layers, [max(row[-1], 1e-30) for row in rows], style="o-")]
    plot_curves(out / "layer_differences", diffs, "layer", "max abs difference", "layer outputs", log_y=True)
    evaluation = result["evaluation"]
    write_evaluation_report(out / "evaluation", evaluation)
    write_json(out / "metrics.json", result)
    page = Page(f"implicit-icl demo: {result['model']}")
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
    page.heading("What the patch changes, layer by layer")
    page.figure("patch_norms.png", "Frobenius norm of each layer's ΔW on the MLP matrices (from the rank-1 factors).")
    page.figure(
        "layer_differences.png",
        "Per layer, the largest |patched − with context| difference of the layer output at the query's last token "
        "(float rounding).",
    )
    page.table(header, rows, "Per layer: ‖ΔW‖ of each changed matrix and the largest difference of its output.")
    generation = result["generation"]
    page.heading("Greedy generation")
    page.table(
        ["", "greedy continuation"],
        [[label, repr(generation[side])] for side, label in SIDES.items()],
        f"Greedy generation of the next tokens; the patched side feeds each new token alone under its own exact "
        f"patch. Agreement with the context: {generation['agreement']:.2f} of the tokens.",
    )
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
    return page.write(out)
