"""`implicit-icl evaluate`: the batched zero-shot / ICL / patched machinery on tiny models against per-prompt
patches and HF's own forward and generate, the metrics, and the command on the default model (reduced)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import float64_softmax
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from implicit_icl.cli import app
from implicit_icl.hf import compute_patch, compute_patches, patched_generate
from implicit_icl.models.zoo import VOCAB_SIZE, tiny_model
from implicit_icl.studies.evaluate import run as suite
from implicit_icl.studies.evaluate.metrics import disagreements, first_token_metrics
from implicit_icl.studies.evaluate.scores import EvaluationSettings, Scores, answer_batch
from implicit_icl.tasks import EncodedPrompt, Example, Prompt
from implicit_icl.tasks.evaluate import answer_ends, greedy_continuations, next_token_logits

runner = CliRunner()
NEWLINE = 7  # the fake tokenizer's separator


class DigitTokenizer:
    """Enough of a tokenizer for whole answers on a tiny model: token 7 is a newline, 96 the end."""

    eos_token_id = 96

    def decode(self, ids, skip_special_tokens=False):
        return "".join("\n" if i == NEWLINE else f"<{i}>" for i in ids)


def id_prompts(lengths: list[tuple[int, int, int]], seed: int) -> list[EncodedPrompt]:
    """Prompts of random ids: (context, query, answer) lengths."""
    generator = torch.Generator().manual_seed(seed)
    return [
        EncodedPrompt(*(torch.randint(0, VOCAB_SIZE, (n,), generator=generator) for n in (c, q, a)))
        for c, q, a in lengths
    ]


def hf_last_logits(model, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
    positions = torch.arange(start, start + len(ids))[None]
    return model(ids[None], position_ids=positions).logits[0, -1]


@settings(max_examples=4, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 24), st.integers(1, 4), st.just(1)), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_batched_logits_equal_hfs_forward_and_the_per_prompt_patch(lengths, seed):
    model = tiny_model("llama", seed=seed % 3)
    prompts = id_prompts(lengths, seed)
    with float64_softmax(), torch.no_grad():
        logits = answer_batch(model, prompts, torch.float64).logits
        for row, prompt in enumerate(prompts):
            torch.testing.assert_close(logits.icl[row], hf_last_logits(model, prompt.input_ids), atol=1e-10, rtol=0)
            torch.testing.assert_close(
                logits.zero_shot[row], hf_last_logits(model, prompt.query_ids), atol=1e-10, rtol=0
            )
            patch = compute_patch(model, prompt.context_ids, prompt.query_ids)
            with patch.applied(model, via="weights"):  # one prompt, its own patch in the weights
                alone = hf_last_logits(model, prompt.query_ids, start=len(prompt.context_ids))
            torch.testing.assert_close(logits.patched[row], alone, atol=1e-9, rtol=0)
    assert (logits.patched - logits.icl).abs().max() <= 1e-9
    assert (logits.zero_shot - logits.icl).abs().max() > 1e-3  # the context matters: the check has teeth


def test_float32_patched_logits_match_icl_with_hfs_own_softmax():
    model = tiny_model("llama", seed=1, dtype=torch.float32)
    logits = answer_batch(model, id_prompts([(20, 3, 1), (7, 1, 1), (33, 2, 1)], seed=4), torch.float32).logits
    assert (logits.patched - logits.icl).abs().max() <= 1e-4
    assert torch.equal(logits.patched.argmax(-1), logits.icl.argmax(-1))


def truncated(tokens: list[int], budget: int) -> list[int]:
    """HF's greedy tokens cut where our decoding stops: after the first separator or end token, or the budget."""
    for index, token in enumerate(tokens[:budget]):
        if token in (NEWLINE, DigitTokenizer.eos_token_id):
            return tokens[: index + 1]
    return tokens[:budget]


def test_whole_answers_match_hfs_generate_and_patched_generate():
    model, tokenizer = tiny_model("llama", seed=2), DigitTokenizer()
    prompts = id_prompts([(12, 2, 4), (25, 3, 2), (6, 1, 5)], seed=11)
    with float64_softmax(), torch.no_grad():
        answers = answer_batch(model, prompts, torch.float64, ends=answer_ends(tokenizer))
        zero_shot, icl, patched = answers.zero_shot, answers.icl, answers.patched
        for row, prompt in enumerate(prompts):
            budget = prompt.generation_budget
            generated = model.generate(
                prompt.input_ids[None], max_new_tokens=budget, do_sample=False, eos_token_id=None
            )
            assert icl[row] == truncated(generated[0, len(prompt.input_ids) :].tolist(), budget)
            alone = model.generate(prompt.query_ids[None], max_new_tokens=budget, do_sample=False, eos_token_id=None)
            assert zero_shot[row] == truncated(alone[0, len(prompt.query_ids) :].tolist(), budget)
            # The engine's uncached generator: per-token patches from scratch, the first from the last query
            # token alone.
            reference = patched_generate(
                model, prompt.context_ids, prompt.query_ids, budget, dtype=torch.float64, cache=False
            )
            assert patched[row] == truncated(reference.tokens_patched, budget)
    assert patched == icl


def test_float32_whole_answers_through_hfs_cache_agree_with_the_patched_ones():
    model, tokenizer = tiny_model("llama", seed=3, dtype=torch.float32), DigitTokenizer()
    prompts = id_prompts([(12, 2, 4), (25, 3, 2), (6, 1, 5), (30, 2, 6)], seed=12)
    answers = answer_batch(model, prompts, torch.float32, ends=answer_ends(tokenizer))
    for row, prompt in enumerate(prompts):
        budget = prompt.generation_budget
        generated = model.generate(prompt.input_ids[None], max_new_tokens=budget, do_sample=False, eos_token_id=None)
        assert answers.icl[row] == truncated(generated[0, len(prompt.input_ids) :].tolist(), budget)
    assert answers.patched == answers.icl
    assert (answers.logits.patched - answers.logits.icl).abs().max() <= 1e-4


def uncached_patched_answers(model, prompts, first_tokens, ends) -> list[list[int]]:
    """The reference: each step re-reads the whole sequence and patches its newest token from scratch."""

    def next_tokens(sequences):
        patches = compute_patches(model, [(s[:-1], s[-1:]) for s in sequences])
        with patches.applied(model):
            return next_token_logits(
                model, [s[-1:] for s in sequences], [torch.tensor([len(s) - 1]) for s in sequences]
            ).argmax(-1)

    sequences, budgets = [p.input_ids for p in prompts], [p.generation_budget for p in prompts]
    return greedy_continuations(next_tokens, sequences, budgets, ends, first_tokens)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
def test_cached_whole_answers_equal_the_uncached_reference(family):
    model, tokenizer = tiny_model(family, seed=5, dtype=torch.float32), DigitTokenizer()
    prompts = id_prompts([(12, 2, 5), (25, 3, 3), (6, 1, 6), (30, 2, 6)], seed=13)
    ends = answer_ends(tokenizer)
    answers = answer_batch(model, prompts, torch.float32, ends=ends)
    first = [answer[0] for answer in answers.patched]
    assert answers.patched == uncached_patched_answers(model, prompts, first, ends)
    assert sum(len(answer) for answer in answers.patched) > len(prompts)  # answers of more than one token


def test_metrics_pair_the_sides_and_list_every_disagreement():
    scores = Scores(
        answer_token=[5, 5, 6, 7],
        zero_shot_top=[1, 5, 1, 1],
        icl_top=[5, 5, 6, 2],
        patched_top=[5, 5, 6, 3],
        icl_margin=[3.0, 2.0, 1.0, 1e-4],
        max_abs_logit_diff=[1e-6, 2e-6, 1e-6, 5e-4],
    )
    metrics = first_token_metrics(scores, seed=0)
    assert metrics["zero_shot_accuracy"] == 0.25 and metrics["icl_accuracy"] == metrics["patched_accuracy"] == 0.75
    assert metrics["icl_accuracy_ci95"] == metrics["patched_accuracy_ci95"]  # paired resamples
    assert metrics["icl_minus_zero_shot"] == 0.5 and metrics["patched_agreement"] == 0.75
    assert metrics["max_abs_logit_diff"] == 5e-4 and metrics["min_icl_margin"] == 1e-4
    low, high = metrics["icl_accuracy_ci95"]
    assert 0 <= low <= 0.75 <= high <= 1
    prompts = [Prompt((Example("a", "b"),), Example(f"q{i}", "x")) for i in range(4)]
    (row,) = disagreements(scores, prompts, DigitTokenizer())
    assert row["prompt"] == 3 and row["input"] == "q3" and row["icl_top2_margin"] == 1e-4
    assert (row["icl_token"], row["patched_token"]) == ("<2>", "<3>")


# --- bad input: one line, exit 2, before any model loads ---


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(suite, "load_model", refuse)


def write_task_file(tmp_path, entries) -> str:
    path = tmp_path / "numbers.json"
    path.write_text(json.dumps(entries), encoding="utf-8")
    return str(path)


NUMBERS = [{"input": word, "output": str(i)} for i, word in enumerate(["zero", "one", "two", "three", "four", "five"])]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--task", "capitals"], "no task called 'capitals'"),
        (["--task", "next_letter", "--shots", "50"], "has 50 examples, too few for 50 shots plus a query"),
        (["--task", "antonym", "--n", "0"], "--n must be at least 1"),
        (["--task", "antonym", "--shots", "0"], "--shots must be at least 1"),
        (["--task", "antonym", "--dtype", "float16"], "unknown --dtype"),
        ([], "give at least one --task NAME"),
        (["--task", "antonym", "--out", __file__], "is a file, not a folder"),
    ],
)
def test_bad_input_fails_in_one_line(no_model_load, arguments, message):
    result = runner.invoke(app, ["evaluate", *arguments, "--json"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and message in result.stderr and result.stderr.count("\n") == 1


def test_a_malformed_task_file_fails_in_one_line(no_model_load, tmp_path):
    path = write_task_file(tmp_path, [{"input": "one", "output": 1}])
    result = runner.invoke(app, ["evaluate", "--task-file", path])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "entry 0 is unusable: its output 1 is not a string" in result.stderr


# --- the default model (SmolLM2-135M-Instruct), reduced ---


def test_patched_equals_icl_on_the_default_model(default_model):
    result = suite.run_evaluation(
        None,
        "float32",
        ["present_past", "antonym"],
        [],
        EvaluationSettings(shots=5, n=6, batch_size=6),
        loaded=default_model,
    )
    by_task = {t["task"]: t for t in result["tasks"]}
    for metrics in by_task.values():
        assert metrics["n"] == 6 and metrics["max_abs_logit_diff"] <= 1e-3
        assert metrics["patched_agreement"] == 1.0 and metrics["patched_accuracy"] == metrics["icl_accuracy"]
        assert metrics["whole_answer_agreement"] == 1.0
        assert metrics["whole_answer_patched_accuracy"] == metrics["whole_answer_icl_accuracy"]
        assert not metrics["disagreements"]
    past = by_task["present_past"]
    assert past["icl_accuracy"] >= past["zero_shot_accuracy"] + 0.5  # a strong in-context effect
    assert past["whole_answer_icl_accuracy"] > past["whole_answer_zero_shot_accuracy"]


def test_the_command_reports_the_contract_keys_and_a_task_file(default_model, monkeypatch, tmp_path):
    monkeypatch.setattr(suite, "load_model", lambda name, dtype: default_model)  # the session's model, not a reload
    arguments = ["evaluate", "--task", "uppercase", "--task-file", write_task_file(tmp_path, NUMBERS)]
    arguments += ["--shots", "3", "--n", "3", "--first-token-only", "--out", str(tmp_path / "report"), "--json"]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"] == default_model.name and [t["task"] for t in report["tasks"]] == ["uppercase", "numbers"]
    contract = {"task", "n", "shots", "zero_shot_accuracy", "icl_accuracy", "patched_accuracy", "patched_agreement"}
    for metrics in report["tasks"]:
        assert contract | {"max_abs_logit_diff"} <= set(metrics) and metrics["n"] == 3 and metrics["shots"] == 3
        assert metrics["max_abs_logit_diff"] <= 1e-3 and metrics["patched_agreement"] == 1.0
    assert report["tasks"][1]["kind"] == "user"
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved["tasks"][0]["icl_accuracy"] == report["tasks"][0]["icl_accuracy"]
    page = (tmp_path / "report" / "index.html").read_text()
    assert "accuracy.png" in page and "numbers" in page and (tmp_path / "report" / "accuracy.png").exists()
    table = (tmp_path / "report" / "table.md").read_text().splitlines()
    assert table[2].startswith("| task | kind | zero-shot | ICL | patched |") and table[5].startswith(
        "| numbers | user |"
    )
