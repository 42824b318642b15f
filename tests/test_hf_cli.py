"""`implicit-icl patch` and `implicit-icl generate` on tiny zoo models saved with save_pretrained."""

import json

import pytest
import torch
from typer.testing import CliRunner

from implicit_icl import Patch
from implicit_icl.cli import app
from implicit_icl.engine.spec import SPECS
from implicit_icl.models.zoo import tiny_model

runner = CliRunner()
CONTEXT = "5 17 42 8 91 23 64 3 11 70"


@pytest.fixture(scope="module")
def saved(tmp_path_factory, unsupported_model):
    """family -> directory of a saved float32 zoo model (config + safetensors, no tokenizer)."""
    root = tmp_path_factory.mktemp("models")
    directories = {}
    for family in ("llama", "gemma2", "bert"):
        directories[family] = root / family
        tiny_model(family, seed=1, dtype=torch.float32).save_pretrained(directories[family])
    directories["opt"] = root / "opt"
    unsupported_model.save_pretrained(directories["opt"])
    return directories


def _run(*args: str) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize(("family", "output_side"), [("llama", "down"), ("gemma2", "stable"), ("bert", "down")])
def test_patch_reports_the_contract_keys(saved, family, output_side):
    report = _run("patch", "--model", str(saved[family]), "--context-ids", CONTEXT, "--query-ids", "7")
    assert report["family"] == family and report["output_side"] == output_side
    assert report["model_dtype"] == "float32" and report["arithmetic_dtype"] == "float64"
    assert report["max_abs_logit_diff"] <= 1e-4 and max(report["layer_max_abs_diffs"]) <= 1e-4
    assert report["baseline_max_abs_logit_diff"] > 0.1 and report["top1_match"]
    assert report["n_layers"] == len(report["layer_max_abs_diffs"])
    assert report["modules"] == list(dict.fromkeys(row["parameter"].rsplit(".", 1)[0] for row in report["changes"]))
    assert all(row["norm"] > 0 for row in report["changes"])


def test_patch_in_float64_with_a_dropped_span_saves_what_it_reports(saved, tmp_path):
    report = _run(
        "patch", "--model", str(saved["llama"]), "--context-ids", CONTEXT, "--query-ids", "7 9",
        "--drop", "2:5", "--dtype", "float64", "--output", "bias", "--save", str(tmp_path / "patch"),
    )  # fmt: skip
    assert report["drop"] == [2, 5] and report["max_abs_logit_diff"] <= 1e-9
    patch = Patch.load(tmp_path / "patch")
    assert patch.drop == (2, 5) and patch.output == "bias"
    assert [row["parameter"] for row in report["changes"]] == list(patch.deltas)
    assert [row["norm"] for row in report["changes"]] == pytest.approx([row["norm"] for row in patch.summary()])


def test_patch_of_a_bfloat16_model_states_both_dtypes(saved):
    arguments = ["--context-ids", CONTEXT, "--query-ids", "7", "--dtype", "bfloat16", "--arithmetic", "float32"]
    report = _run("patch", "--model", str(saved["gemma2"]), *arguments)
    assert (report["model_dtype"], report["arithmetic_dtype"]) == ("bfloat16", "float32")
    # bfloat16 rounds at ~1e-2 relative; the context moves the logits far more than that.
    assert report["max_abs_logit_diff"] < 0.1 * report["baseline_max_abs_logit_diff"]


def test_patch_exports_a_peft_adapter(saved, tmp_path):
    arguments = ["--context-ids", CONTEXT, "--query-ids", "7", "--peft", str(tmp_path / "adapter")]
    report = _run("patch", "--model", str(saved["llama"]), *arguments)
    assert report["peft_adapter"] == str(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 1 and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    result = runner.invoke(app, ["patch", "--model", str(saved["gemma2"]), *arguments])
    assert result.exit_code == 2 and "LoRA cannot" in result.stderr  # a norm-scale shift has no LoRA form


def test_generate_agrees_token_for_token(saved):
    report = _run("generate", "--model", str(saved["llama"]), "--context-ids", CONTEXT, "--query-ids", "7")
    assert len(report["tokens_with_context"]) == len(report["tokens_patched"]) == 32
    assert report["tokens_patched"] == report["tokens_with_context"] and report["agreement"] == 1.0
    assert report["teacher_forced_agreement"] == 1.0
    assert report["seconds_per_token_patched"] > 0 and report["seconds_per_token_plain"] > 0
    assert report["patched_to_plain"] == pytest.approx(
        report["seconds_per_token_patched"] / report["seconds_per_token_plain"]
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--context-ids", "", "--query-ids", "7"], "context is empty"),
        (["--context-ids", " ".join(["1"] * 200), "--query-ids", "7"], "at most 128 positions"),
        (["--context-ids", "1 2 500", "--query-ids", "7"], "outside the model's vocabulary"),
        (["--context-ids", "1 2 x", "--query-ids", "7"], "integers"),
        (["--context-ids", CONTEXT, "--query-ids", "7", "--drop", "4:40"], "--drop 4:40"),
        (["--context-ids", CONTEXT, "--query-ids", "7", "--drop", "4"], "START:END"),
        (["--context", "some text", "--query-ids", "7"], "no tokenizer"),
        (["--context-ids", CONTEXT, "--context", "both", "--query-ids", "7"], "exactly one"),
        (["--context-ids", CONTEXT, "--query-ids", "7", "--output", "norm"], "no norm after its MLP"),
        (["--context-ids", CONTEXT, "--query-ids", "7", "--dtype", "float16"], "--dtype"),
    ],
)
def test_bad_input_is_one_line_and_a_non_zero_exit(saved, arguments, message):
    result = runner.invoke(app, ["patch", "--model", str(saved["llama"]), *arguments])
    assert result.exit_code == 2
    # The last stderr line is the error (HF's weight-loading bar may come before it); stdout stays empty.
    assert result.stderr.splitlines()[-1].startswith("error: ") and result.stderr.count("error: ") == 1
    assert message in result.stderr.splitlines()[-1] and result.stdout == ""


def test_an_encoder_does_not_generate(saved):
    arguments = ["--model", str(saved["bert"]), "--context-ids", CONTEXT, "--query-ids", "7"]
    result = runner.invoke(app, ["generate", *arguments])
    assert result.exit_code == 2 and "does not generate" in result.stderr


def test_unknown_family_and_missing_model_are_refused(saved, tmp_path):
    result = runner.invoke(app, ["patch", "--model", str(saved["opt"]), "--context-ids", "1 2", "--query-ids", "3"])
    assert result.exit_code == 2 and "unsupported model family 'opt'" in result.stderr
    assert "llama" in result.stderr and "spec.py" in result.stderr
    result = runner.invoke(
        app, ["patch", "--model", str(tmp_path / "nothing"), "--context-ids", "1", "--query-ids", "3"]
    )
    assert result.exit_code == 2 and "does not exist" in result.stderr


@pytest.mark.parametrize("family", sorted(SPECS))
def test_every_family_saved_with_its_head_gives_an_exact_patch(family, tmp_path):
    """save_pretrained writes config.architectures (GPT2LMHeadModel, LlamaForCausalLM, BertModel, ...); the
    CLI loads it through them, and the layers are found under whatever head the model carries."""
    model = tiny_model(family, seed=2)
    model.save_pretrained(tmp_path)
    arguments = ["--model", str(tmp_path), "--context-ids", CONTEXT, "--query-ids", "7 9", "--dtype", "float64"]
    report = _run("patch", *arguments)
    assert report["family"] == family and report["top1_match"]
    tolerance = 1e-5 if family in ("gemma2", "gemma3_text") else 1e-9  # HF's float32 norms in Gemma 2/3
    assert report["max_abs_logit_diff"] <= tolerance and max(report["layer_max_abs_diffs"]) <= tolerance
    assert report["baseline_max_abs_logit_diff"] > 1e-3


def test_a_bare_base_model_without_head_is_patched_too(tmp_path):
    """A GPT2Model saved on its own: its layers sit at "h", not "transformer.h"."""
    tiny_model("gpt2", seed=1).transformer.save_pretrained(tmp_path)
    report = _run("patch", "--model", str(tmp_path), "--context-ids", CONTEXT, "--query-ids", "7", "--dtype", "float64")
    assert report["modules"][0] == "h.0.mlp.c_fc" and report["max_abs_logit_diff"] <= 1e-9


def test_text_prompts_on_the_default_model_work_without_model(default_model, monkeypatch):
    """No --model: the default model and its GGUF tokenizer (the session's copy; loading is tested in test_hf_load)."""
    from implicit_icl.models import options

    monkeypatch.setattr(options, "load_model", lambda name, dtype: default_model)
    context, query = "Q: walk\nA: walked\n\nQ: eat\nA: ate\n\nQ: take\nA: took\n\n", "Q: speak\nA:"
    report = _run("patch", "--context", context, "--query", query, "--arithmetic", "float32")
    assert report["n_layers"] == 30 and report["top1_match"]
    assert report["max_abs_logit_diff"] <= 1e-3 < report["baseline_max_abs_logit_diff"]
    generated = _run("generate", "--context", context, "--query", query, "--max-new-tokens", "3")
    assert generated["tokens_patched"] == generated["tokens_with_context"]
    with_context = default_model.tokenizer(context + query, return_tensors="pt").input_ids
    hf_tokens = default_model.model.generate(with_context, max_new_tokens=3, do_sample=False)[
        0, with_context.shape[1] :
    ]
    assert generated["tokens_with_context"] == hf_tokens.tolist()
