"""The per-demonstration study, its controls, the fine-tuning comparison and `implicit-icl dynamics`.

Real-model tests use the shared default model (SmolLM2-135M-Instruct, float32), reduced to a few shots and
prompts; tiny zoo models cover the command's context mode and the factored SGD."""

import copy
import json
import random

import pytest
import torch
from helpers import float64_softmax
from typer.testing import CliRunner

from implicit_icl.analyses.dynamics.prefixes import last_position_logits, prefix_patches
from implicit_icl.analyses.dynamics.series import answer_scores, layer_series
from implicit_icl.cli import app
from implicit_icl.engine.forward import ForwardInputs
from implicit_icl.errors import ImplicitICLError
from implicit_icl.hf import compute_patch
from implicit_icl.models.zoo import tiny_model
from implicit_icl.studies.dynamics.finetune import (
    FactoredSGD,
    choose_step_size,
    held_out_examples,
    icl_heldout,
    online_sgd,
    trained_matrices,
)
from implicit_icl.studies.dynamics.study import (
    demonstration_boundaries,
    shuffled_answers,
    untrained_model,
)
from implicit_icl.tasks import Example, Prompt, encode, sample_prompts, task

runner = CliRunner()


@pytest.fixture(scope="module")
def antonym_prompt(default_model):
    prompt = sample_prompts(task("antonym"), 3, 1, seed=0)[0]
    return prompt, encode(default_model.tokenizer, prompt), demonstration_boundaries(default_model.tokenizer, prompt)


def test_demonstration_boundaries_are_the_shorter_prompts(default_model, antonym_prompt):
    prompt, encoded, boundaries = antonym_prompt
    assert boundaries[0] == 0 and boundaries[-1] == encoded.context_ids.numel()
    assert all(a < b for a, b in zip(boundaries, boundaries[1:], strict=False)) and len(boundaries) == 4
    for shots, boundary in enumerate(boundaries):
        shorter = encode(default_model.tokenizer, Prompt(prompt.shots[:shots], prompt.query)).context_ids
        assert torch.equal(encoded.context_ids[:boundary], shorter)


def test_one_pass_equals_the_loop_on_the_default_model(default_model, antonym_prompt):
    """float32 with HF's arithmetic: the reported series and answer probabilities to 1e-5 relative (series
    relative to their largest value per layer), logits to 1e-5 of their scale; float64 with the softmax in
    float64: the patches of every demonstration boundary equal compute_patch of that prompt to 1e-9."""
    _, encoded, boundaries = antonym_prompt
    model = default_model.model
    one_pass = prefix_patches(model, encoded.context_ids, encoded.query_ids, boundaries, dtype=torch.float32)
    loop = prefix_patches(model, encoded.context_ids, encoded.query_ids, boundaries, dtype=torch.float32, method="loop")
    assert one_pass.method == "one pass" and loop.method == "loop"
    a, b = layer_series(model, one_pass), layer_series(model, loop)
    for name in ("update_norms", "increment_norms", "alignment", "output_norms", "gradient_step_norms"):
        x, y = getattr(a, name), getattr(b, name)
        scale = y.nan_to_num(0).abs().amax(-1, keepdim=True)
        assert ((x - y).nan_to_num(0).abs() <= 1e-5 * scale).all(), name
    p_one, _ = answer_scores(one_pass.patched_logits, encoded.answer_token)
    p_loop, _ = answer_scores(loop.patched_logits, encoded.answer_token)
    assert ((p_one - p_loop).abs() <= 1e-5 * p_loop).all()
    logit_scale = loop.context_logits.abs().max()
    assert (one_pass.patched_logits - loop.context_logits).abs().max() <= 1e-5 * logit_scale
    assert one_pass.max_abs_logit_diff <= 1e-5 * logit_scale

    double = copy.deepcopy(model).double()
    with float64_softmax():
        exact = prefix_patches(double, encoded.context_ids, encoded.query_ids, boundaries)
        assert exact.max_abs_logit_diff <= 1e-9
        for entry, boundary in enumerate(boundaries[1:], start=1):
            single = compute_patch(double, encoded.context_ids[:boundary], encoded.query_ids)
            for name, delta in single.deltas.items():
                got = exact.patch[entry].deltas[name]
                expected = delta.dense() if hasattr(delta, "dense") else delta
                got = got.dense() if hasattr(got, "dense") else got
                assert (got - expected).abs().max() <= 1e-9 * (1 + expected.abs().max()), name


def test_shuffled_answers_move_every_output_and_keep_the_query():
    prompt = sample_prompts(task("present_past"), 5, 1, seed=3)[0]
    for seed in range(20):
        shuffled = shuffled_answers(prompt, random.Random(seed))
        assert [s.input for s in shuffled.shots] == [s.input for s in prompt.shots] and shuffled.query == prompt.query
        assert sorted(s.output for s in shuffled.shots) == sorted(s.output for s in prompt.shots)
        assert all(new.output != old.output for new, old in zip(shuffled.shots, prompt.shots, strict=True))
    with pytest.raises(ImplicitICLError, match="at least 2 demonstrations"):
        shuffled_answers(Prompt((Example("go", "went"),), prompt.query), random.Random(0))


def test_untrained_model_shares_the_architecture_not_the_weights():
    model = tiny_model("llama", seed=0, dtype=torch.float32)
    first, again = untrained_model(model, seed=5), untrained_model(model, seed=5)
    assert not first.training and first.config.to_dict() == model.config.to_dict()
    weights = dict(model.named_parameters())
    assert all(torch.equal(p, dict(again.named_parameters())[n]) for n, p in first.named_parameters())
    assert any(not torch.equal(p, weights[n]) for n, p in first.named_parameters() if p.dim() == 2)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_factored_sgd_is_the_dense_gradient_step_and_leaves_the_weights_alone(family):
    """One step of FactoredSGD equals W − η ∇_W L computed densely by autograd on a copy of the model (GPT-2's
    Conv1D stores W transposed: the factors stay in nn.Linear orientation)."""
    model = tiny_model(family, seed=1)  # float64: the factors are kept in float64
    names = [trained_matrices(model, [0])[0], trained_matrices(model, [1])[-1]]  # e.g. layer 0's gate, 1's up
    before = {n: p.clone() for n, p in model.named_parameters()}
    ids = [torch.tensor([3, 5, 7, 9]), torch.tensor([11, 13])]
    targets = torch.tensor([4, 8])
    inputs = ForwardInputs.padded(ids)
    step_sizes = torch.tensor([0.3, 0.05], dtype=torch.float64)
    sgd = FactoredSGD(model, names, rows=2)
    with torch.enable_grad(), sgd.applied(record=True):
        loss = torch.nn.functional.cross_entropy(last_position_logits(model, inputs), targets, reduction="sum")
        sgd.step(loss, step_sizes)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    for row in range(2):
        reference = copy.deepcopy(model)
        weights = [reference.get_parameter(name) for name in names]
        one = ForwardInputs.padded([ids[row]])
        row_loss = torch.nn.functional.cross_entropy(last_position_logits(reference, one), targets[row : row + 1])
        gradients = torch.autograd.grad(row_loss, weights)
        for name, gradient in zip(names, gradients, strict=True):
            gradient = gradient.T if family == "gpt2" else gradient
            torch.testing.assert_close(sgd.delta(name)[row].dense(), -step_sizes[row] * gradient, rtol=1e-9, atol=1e-12)
    # the fine-tuned model is W + D through the hooks: the same logits as the weights stepped densely
    stepped = copy.deepcopy(model)
    with torch.no_grad():
        for name in names:
            dense = sgd.delta(name)[0].dense()
            stepped.get_parameter(name).add_(dense.T if family == "gpt2" else dense)
        with sgd.applied():
            hooked = last_position_logits(model, ForwardInputs.padded([ids[0], ids[0]]))[0]
        torch.testing.assert_close(hooked, last_position_logits(stepped, ForwardInputs.padded([ids[0]]))[0])


def test_fine_tuning_comparison_on_the_default_model(default_model):
    model, tokenizer = default_model.model, default_model.tokenizer
    chosen = task("present_past")
    prompts = sample_prompts(chosen, 2, 2, seed=0)
    rng = random.Random(0)
    held_out = [held_out_examples(chosen, p, 2, rng, 0) for p in prompts]
    for prompt, examples in zip(prompts, held_out, strict=True):
        assert not {e.input for e in examples} & ({s.input for s in prompt.shots} | {prompt.query.input})
    implicit = []
    for prompt in prompts:
        encoded = encode(tokenizer, prompt)
        boundaries = demonstration_boundaries(tokenizer, prompt)
        trajectory = prefix_patches(model, encoded.context_ids, encoded.query_ids, boundaries, verify=False)
        implicit.append({n: d for n, d in trajectory.patch.deltas.items() if "gate_proj" in n or "up_proj" in n})
    eta, scores = choose_step_size(model, tokenizer, prompts[:1], held_out[:1], grid=(1e-3, 1e-1), layers=[0, 29])
    assert eta in (1e-3, 1e-1) and len(scores) == 2 and scores[[1e-3, 1e-1].index(eta)] == max(scores)
    run = online_sgd(model, tokenizer, prompts, held_out, torch.full((2,), eta), [0, 29], implicit)
    assert run.layers == [0, 29] and run.alignment.shape == (2, 2, 2)
    assert (run.alignment.abs() <= 1).all() and run.heldout_correct.shape == (2, 3, 2)
    # before any step the fine-tuned model is the model itself, on the query alone
    encoded = encode(tokenizer, prompts[0])
    with torch.no_grad():
        alone, _ = answer_scores(model(encoded.query_ids[None]).logits[:, -1], encoded.answer_token)
    assert run.query_log_probability.shape == (2, 3)
    assert abs(run.query_log_probability[0, 0].exp() - alone[0]) <= 1e-5
    # and in-context learning with zero demonstrations is the same model on the same held-out queries
    log_probability, correct = icl_heldout(model, tokenizer, prompts, held_out)
    assert log_probability.shape == (2, 3, 2) and correct.dtype == torch.bool
    assert torch.allclose(log_probability[:, 0], run.heldout_log_probability[:, 0], atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "mixtral"])
def test_dynamics_command_context_mode_reports_the_contract_keys(tmp_path, family):
    directory = tmp_path / "model"
    tiny_model(family, seed=1, dtype=torch.float32).save_pretrained(directory)
    result = runner.invoke(
        app,
        ["dynamics", "--model", str(directory), "--context-ids", "5 17 42 8 91 23 64", "--query-ids", "7 9",
         "--target-id", "11", "--out", str(tmp_path / "report"), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["prefix_lengths"] == list(range(8)) and report["method"] == "one pass"
    assert report["max_abs_logit_diff"] <= 1e-4 and report["seconds"] > 0
    assert len(report["layers"]["increment_norms"]) == 2 and len(report["layers"]["increment_norms"][0]) == 7
    assert len(report["target"]["probability"]) == 8
    # the GD check reads dense MLP input matrices, which a mixture of experts does not have
    assert report["gradient_descent"][0]["shared_reference"] if family == "qwen2" else report["gradient_descent"] == []
    assert len(report["controls"]["untrained_increment_norms_stacked"]) == 7
    assert (tmp_path / "report" / "index.html").is_file() and (tmp_path / "report" / "dynamics.json").is_file()
    assert json.loads((tmp_path / "report" / "dynamics.json").read_text())["prefix_lengths"] == list(range(8))


def test_dynamics_command_task_mode_on_the_default_model(tmp_path):
    result = runner.invoke(
        app,
        ["dynamics", "--task", "antonym", "--shots", "2", "--n", "2", "--finetune", "--finetune-prompts", "1",
         "--step-size", "0.01", "--out", str(tmp_path), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for key in ("prefix_lengths", "max_abs_logit_diff", "seconds", "layers", "per_demonstration", "finetune"):
        assert key in report
    assert report["max_abs_logit_diff"] <= 1e-3 and report["task"] == "antonym"
    study = report["per_demonstration"]
    assert set(study["conditions"]) == {"trained", "shuffled answers", "untrained"}
    assert set(study["trained_vs_controls"]) == {"shuffled answers", "untrained"}
    layers = report["n_layers"]
    for name, condition in study["conditions"].items():
        assert condition["max_abs_logit_diff"] <= 1e-3, name  # the patched query is in-context learning
        probability = condition["answer_probability"]
        assert len(probability["mean"]) == 3 and all(0 <= p <= 1 for p in probability["mean"])
        assert all(lo <= m <= hi for lo, m, hi in zip(*(probability[k] for k in ("low", "mean", "high")), strict=True))
        assert (
            len(condition["shrinkage_per_layer"]["mean"]) == layers and condition["relative_increment"]["mean"][0] == 1
        )
    # without demonstrations both models of the trained weights see the same query alone
    zero_shot = [study["conditions"][n]["answer_probability"]["mean"][0] for n in ("trained", "shuffled answers")]
    assert zero_shot[0] == pytest.approx(zero_shot[1], rel=1e-4)  # float32 runs of different batch layouts
    finetune = report["finetune"]
    assert finetune["step_size"] == {"trained": 0.01, "untrained": 0.01} and finetune["prompts"] == 1
    assert len(finetune["conditions"]["untrained"]["alignment_per_layer"]["mean"]) == layers
    assert (tmp_path / "finetune_alignment.png").is_file() and (tmp_path / "answer_probability.png").is_file()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--context-ids", "1 2", "--query-ids", "3", "--task", "antonym"], "drop --context"),
        (["--task", "antonym", "--shots", "1"], "--shots must be at least 2"),
        (["--task", "no_such_task"], "no task called"),
        (["--context-ids", "1 2"], "exactly one of --query"),
        (["--query-ids", "1 2"], "exactly one of --context"),
        (["--context-ids", "1 2", "--query-ids", "3", "--arithmetic", "float16"], "unknown --arithmetic"),
    ],
)
def test_dynamics_command_refuses_bad_input_in_one_line(arguments, message):
    result = runner.invoke(app, ["dynamics", *arguments, "--json"])
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
