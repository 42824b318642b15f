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
from transformers import PreTrainedTokenizerBase

from implicit_icl.engine.construct import compute_patch
from implicit_icl.engine.generate import patched_generate
from implicit_icl.engine.verify import verify_patch
from implicit_icl.errors import ImplicitICLError
from implicit_icl.models.load import LoadedModel, load_model
from implicit_icl.report.pages import check_out_folder
from implicit_icl.studies.demo.report import SIDES, write_demo_report
from implicit_icl.studies.evaluate.run import run_evaluation
from implicit_icl.studies.evaluate.scores import EvaluationSettings
from implicit_icl.tasks import Example, Prompt, encode, sample_prompts, task
from implicit_icl.tasks.evaluate import decode_greedily, next_token_logits

DEMO_PROMPT = Prompt(
    shots=tuple(
        Example(verb, past)
        for verb, past in (("walk", "walked"), ("go", "went"), ("eat", "ate"), ("write", "wrote"), ("take", "took"))
    ),
    query=Example("speak", "spoke"),
)
EVAL_TASKS = ("present_past", "antonym", "country_capital", "associative_recall")


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
    alone = decode_greedily(model, [query], [settings.new_tokens], lambda token: False)[1][0]  # through HF's cache
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
