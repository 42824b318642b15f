"""`implicit-icl demo` on the default model, reduced: what it prints and writes is what the model computes."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from implicit_icl.cli import app
from implicit_icl.studies.demo import run as demo
from implicit_icl.tasks import encode

runner = CliRunner()
REDUCED = ["--eval-task", "present_past", "--eval-prompts", "2", "--new-tokens", "3"]


def hf_next_token(model, ids: torch.Tensor) -> tuple[int, float]:
    """HF's own forward, no padding, no hooks: the most likely next token, its probability and id."""
    with torch.no_grad():
        probabilities = model(ids[None]).logits[0, -1].double().softmax(-1)
    return probabilities.argmax().item(), float(probabilities.max())


def test_the_demo_prints_and_writes_what_the_model_computes(default_model, monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "load_model", lambda: default_model)  # the session's model, not a reload
    result = runner.invoke(app, ["demo", "--out", str(tmp_path), *REDUCED])
    assert result.exit_code == 0, result.stderr
    printed = " ".join(result.stdout.split())  # rich wraps long lines
    assert "first-token accuracy [bootstrap 95%]" in printed  # brackets printed, not taken as rich markup

    model, tokenizer = default_model.model, default_model.tokenizer
    encoded = encode(tokenizer, demo.DEMO_PROMPT)
    icl_id, icl_p = hf_next_token(model, encoded.input_ids)
    alone_id, alone_p = hf_next_token(model, encoded.query_ids)
    assert icl_id == encoded.answer_token != alone_id  # the built-in prompt: wrong alone, right in context
    icl, alone = repr(tokenizer.decode([icl_id])), repr(tokenizer.decode([alone_id]))
    assert (
        f"The query alone under the patch says {icl} (p = {icl_p:.2f}, right): the same token as with the context, "
        f"{icl} (p = {icl_p:.2f}, right). The query alone without the patch says {alone} (p = {alone_p:.2f}, wrong)."
    ) in printed
    with torch.no_grad():
        greedy = model.generate(encoded.input_ids[None], max_new_tokens=3, do_sample=False)[0, len(encoded.input_ids) :]
    continuation = repr(tokenizer.decode(greedy))
    assert f"with the context: {continuation}" in printed and f"query alone + patch: {continuation}" in printed
    assert "agreement 1.00" in printed

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["max_abs_logit_diff"] <= 1e-3 and metrics["top1_match"]
    assert len(metrics["layers"][1]) == model.config.num_hidden_layers
    assert [t["task"] for t in metrics["evaluation"]["tasks"]] == ["present_past"]
    page = (tmp_path / "index.html").read_text()
    for figure in ("patch_norms.png", "layer_differences.png", "evaluation/accuracy.png"):
        assert figure in page and (tmp_path / figure).exists()


def test_the_json_headline(default_model, monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "load_model", lambda: default_model)
    result = runner.invoke(app, ["demo", "--out", str(tmp_path), "--json", *REDUCED[:4], "--new-tokens", "1"])
    assert result.exit_code == 0, result.stderr
    headline = json.loads(result.stdout)
    assert headline["patched_top_token"] == headline["with_context_top_token"] == " spoke"
    assert headline["patched_top_probability"] == pytest.approx(headline["with_context_top_probability"], abs=1e-4)
    assert headline["max_abs_logit_diff"] <= 1e-3 and headline["top1_match"]
    assert headline["query_alone_top_token"] != " spoke" and headline["generation_agreement"] == 1.0
    assert set(headline["evaluation"]["present_past"]) == {"zero_shot", "icl", "patched"}


def test_bad_demo_options_fail_in_one_line_before_loading(monkeypatch):
    monkeypatch.setattr(demo, "load_model", lambda: (_ for _ in ()).throw(AssertionError("loaded")))
    for arguments, message in (
        (["--eval-task", "capitals"], "no task called 'capitals'"),
        (["--eval-prompts", "0"], "--eval-prompts must be at least 1"),
        (["--new-tokens", "0"], "--new-tokens must be at least 1"),
        (["--out", __file__], "is a file, not a folder"),
    ):
        result = runner.invoke(app, ["demo", *arguments])
        assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1


def test_the_toy_demo_stays_available(monkeypatch, tmp_path):
    from implicit_icl.toy import reproduce

    calls = []
    monkeypatch.setattr(reproduce, "demo", lambda out: calls.append(out) or {"toy": 1.0})
    result = runner.invoke(app, ["demo", "--toy", "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout) == {"toy": 1.0} and calls == [tmp_path]
