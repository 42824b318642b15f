"""The compile study and `implicit-icl compile`: splits, the run of every method, the JSON contract, exports,
the report, and the editing measurement (tiny models with id-level data; the default model, reduced)."""

import json
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from implicit_icl import Patch
from implicit_icl.cli import app
from implicit_icl.engine.queries import reduced_logits
from implicit_icl.errors import ImplicitICLError
from implicit_icl.models.load import LoadedModel
from implicit_icl.models.zoo import VOCAB_SIZE, tiny_model
from implicit_icl.studies.compile.methods import StudySettings, run_split
from implicit_icl.studies.compile.report import aggregate, run_record, write_study_report
from implicit_icl.studies.compile.run import CONTRACT, Source, compile_command
from implicit_icl.studies.compile.splits import encode_split, shuffled_labels, split_task
from implicit_icl.studies.editing.study import FACTS, edit_fact, encode_fact
from implicit_icl.tasks import Example, task

CONTRACT_KEYS = {"heldout_top1_agreement", "baseline_top1_agreement", "compiled_accuracy", "icl_accuracy",
                 "zero_shot_accuracy", "task_vector_accuracy", "function_vector_accuracy", "recovery", "kl_to_icl"}  # fmt: skip


# --- splits ------------------------------------------------------------------------------------------------


def test_splits_are_disjoint_sized_and_reproducible():
    big = split_task(task("uppercase"), 5, 64, 16, 50, context=0, seed=0)
    parts = [big.demonstrations, big.calibration, big.dev, big.heldout]
    assert [len(p) for p in parts] == [5, 64, 16, 50] and not big.shrunk
    inputs = [example.input for part in parts for example in part]
    assert len(set(inputs)) == len(inputs)  # disjoint inputs
    assert split_task(task("uppercase"), 5, 64, 16, 50, 0, 0) == big
    other_seed = split_task(task("uppercase"), 5, 64, 16, 50, 0, 1)
    assert other_seed.demonstrations == big.demonstrations and other_seed.heldout != big.heldout
    assert split_task(task("uppercase"), 5, 64, 16, 50, 1, 0).demonstrations != big.demonstrations
    small = split_task(task("us_state_capital"), 5, 64, 16, 50, 0, 0)  # 50 inputs: shrunk, still disjoint
    assert small.shrunk and (len(small.dev), len(small.heldout), len(small.calibration)) == (11, 17, 17)
    with pytest.raises(ImplicitICLError, match="binds its answers inside each prompt"):
        split_task(task("associative_recall"), 5, 64, 16, 50, 0, 0)
    with pytest.raises(ImplicitICLError, match="too few"):
        split_task(task("us_state_capital"), 48, 64, 16, 50, 0, 0)


def test_shuffled_labels_move_every_answer():
    shots = [Example(f"x{i}", f"y{i}") for i in range(5)]
    for seed in range(5):
        shuffled = shuffled_labels(shots, seed)
        assert [s.input for s in shuffled] == [s.input for s in shots]
        assert Counter(s.output for s in shuffled) == Counter(s.output for s in shots)
        assert all(a.output != b.output for a, b in zip(shuffled, shots, strict=True))


# --- the command on a tiny model with id-level data --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama saved as a Hugging Face directory, its context and a labelled calibration file of ids."""
    model = tiny_model("llama", seed=4, dtype=torch.float32)
    directory = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(directory)
    g = torch.Generator().manual_seed(0)
    context = torch.randint(0, VOCAB_SIZE, (24,), generator=g)
    items = [
        {"query": torch.randint(0, VOCAB_SIZE, (3,), generator=g).tolist(), "answer": int(a)}
        for a in torch.randint(0, VOCAB_SIZE, (40,), generator=g)
    ]
    calibration = directory / "calibration.json"
    calibration.write_text(json.dumps(items))
    return model, directory, context, calibration


def test_compile_command_on_ids_gives_the_contract_and_exports_that_reload(tiny, tmp_path):
    model, _, context, calibration = tiny
    loaded = LoadedModel(model, None, "tiny-llama")
    settings = StudySettings(calibration=16, dev=8, n=12, rank=4)
    source = Source(context_ids=" ".join(map(str, context.tolist())), calibration=calibration)
    save, peft, merged = tmp_path / "patch", tmp_path / "adapter", tmp_path / "merged"
    result = compile_command(None, "float32", source, settings, save, peft, merged, tmp_path / "report", loaded)
    assert CONTRACT_KEYS <= set(result) and set(CONTRACT) <= set(result)
    assert result["function_vector_accuracy"] is None and "no function vector" in result["notes"]
    assert (result["calibration_size"], result["dev_size"], result["n_heldout"]) == (16, 8, 12)
    assert result["methods"]["exact_patch"]["top1_agreement"] == 1.0  # the exact patch is ICL
    assert result["methods"]["exact_patch"]["kl_to_icl"] < 1e-8
    assert result["methods"]["icl"]["top1_agreement"] == 1.0 and result["methods"]["icl"]["kl_to_icl"] == 0.0
    json.dumps(result)  # JSON-ready
    # the exports reproduce the saved patch on fresh models
    patch = Patch.load(save)
    assert patch.notes["rank"] == 4 and patch.notes["position_offset"] == 24
    queries = [torch.tensor(q) for q in ([1, 2, 3], [50, 60, 70, 80])]
    with patch.applied(model):
        ours = reduced_logits(model, queries, 24)
    peft = pytest.importorskip("peft")
    adapted = peft.PeftModel.from_pretrained(tiny_model("llama", seed=4, dtype=torch.float32), tmp_path / "adapter")
    assert (reduced_logits(adapted.eval(), queries, 24) - ours).abs().max() <= 1e-5
    merged_model = AutoModelForCausalLM.from_pretrained(merged, attn_implementation="eager").eval()
    assert (reduced_logits(merged_model, queries, 24) - ours).abs().max() <= 1e-5
    page = (tmp_path / "report" / "index.html").read_text()
    assert "calibration" in page and (tmp_path / "report" / "context_calibration_correct.png").is_file()
    assert (tmp_path / "report" / "context_rank_agree.png").is_file()


def test_the_cli_prints_one_json_object_and_refuses_bad_input_in_one_line(tiny):
    _, directory, context, calibration = tiny
    base = ["compile", "--model", str(directory)]
    ids = ["--context-ids", " ".join(map(str, context.tolist())), "--calibration", str(calibration)]
    sizes = ["--calibration-size", "8", "--dev", "4", "--n", "6", "--ridge", "1", "--tokens", "last"]
    done = CliRunner().invoke(app, [*base, *ids, *sizes, "--json"])
    assert done.exit_code == 0, done.stderr
    result = json.loads(done.stdout)
    assert CONTRACT_KEYS <= set(result) and result["choices"]["compiled"] == "in+down λ=1 last"
    bad = CliRunner().invoke(app, [*base, "--task", "nonexistent", "--json"])
    assert bad.exit_code == 2 and bad.stdout == ""
    assert bad.stderr.startswith("error: no task called 'nonexistent'") and bad.stderr.count("\n") == 1


def test_bad_input_is_refused_in_one_line_before_the_model_loads(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("[1, 2")
    few = tmp_path / "few.json"
    few.write_text('["Q: a\\nA:", "Q: b\\nA:"]')
    mixed = tmp_path / "mixed.json"
    mixed.write_text('["Q: a\\nA:", {"query": "Q: b\\nA:", "answer": " b"}, "Q: c\\nA:"]')
    cases = [
        (Source(), "give exactly one of --task"),
        (Source(task="copy", context="x"), "give exactly one of --task"),
        (Source(context="x"), "needs --calibration"),
        (Source(task="copy", calibration=broken), "--calibration goes with --context"),
        (Source(context="x", calibration=broken), "is not JSON"),
        (Source(context="x", calibration=few), "at least 3 queries"),
        (Source(context="x", calibration=mixed), "every query or for none"),
        (Source(context="x", calibration=tmp_path / "missing.json"), "cannot read --calibration"),
    ]
    with pytest.raises(ImplicitICLError, match="cannot read --context-file"):
        Source(context_file=tmp_path / "missing.txt")
    with pytest.raises(ImplicitICLError, match="not both"):
        Source(context="x", context_file=broken)
    assert Source(context_file=broken, calibration=broken).context == "[1, 2"
    for source, message in cases:
        with pytest.raises(ImplicitICLError, match=message) as error:
            compile_command("no-such-model", "float32", source, StudySettings())
        assert "\n" not in str(error.value)
    for kwargs, message in ((dict(n=0), "--n must be at least 1"), (dict(tokens="every"), "tokens must be one of")):
        with pytest.raises(ImplicitICLError, match=message):
            StudySettings(**kwargs)


# --- the default model, reduced ----------------------------------------------------------------------------


def test_every_method_runs_on_the_default_model_and_the_report_pools_them(default_model, tmp_path):
    split = split_task(task("present_past"), 3, 6, 4, 6, context=0, seed=0)
    encoded = encode_split(default_model.tokenizer, split)
    settings = StudySettings(shots=3, calibration=6, dev=4, n=6, search=False, head_layers=(14, 18, 20))
    run = run_split(default_model.model, encoded, settings)
    methods = run["methods"]
    assert set(methods) >= {"icl", "zero_shot", "compiled", "compiled_default", "compiled_bias", "task_vector",
                            "task_vector_mean", "function_vector", "exact_patch"}  # fmt: skip
    assert bool(methods["exact_patch"].agree.all()) and float(methods["exact_patch"].kl.max()) < 1e-3
    assert methods["zero_shot"].kl.mean() > methods["icl"].kl.mean() == 0
    assert 0 <= run["choices"]["task_vector_layer"] < 30 and len(run["choices"]["function_vector_heads"]) in (5, 10, 20)
    record = run_record("present_past", 0, 0, run)
    aggregated = aggregate([record, {**record, "context": 1}])
    entry = aggregated["all"]["methods"]["compiled"]
    assert (
        aggregated["all"]["n_queries"] == 12
        and entry["accuracy_ci95"][0] <= entry["accuracy"] <= entry["accuracy_ci95"][1]
    )
    write_study_report(tmp_path, dict(aggregated=aggregated, runs=[record]), "reduced run")
    assert "function vector" in (tmp_path / "index.html").read_text()


def test_a_stated_fact_compiled_into_an_edit(default_model):
    encoded = [encode_fact(default_model.tokenizer, fact) for fact in FACTS]  # every fact encodes cleanly
    assert all(len(fact.queries) == 7 and bool((fact.wanted[:4] != fact.rival[:4]).all()) for fact in encoded)
    result = edit_fact(default_model, encoded[:2], 0)
    assert torch.equal(result["exact_patch"], result["icl"])  # the exact patch reproduces ICL's preferences
    assert result["compiled"].shape == (7,) and result["compiled_seconds"] > 0
