"""The reproduction end to end on a seconds-long configuration, training, and the shipped checkpoint."""

import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from implicit_icl import ImplicitICLError
from implicit_icl.cli import app
from implicit_icl.toy.experiments import full_context_errors, squared_errors
from implicit_icl.toy.model import ToyConfig
from implicit_icl.toy.reproduce import DEFAULT_MODEL, DEFAULT_TRAINING, SHIPPED_CHECKPOINT, run_study
from implicit_icl.toy.study import StudyConfig, evaluation_sets, learning_checks
from implicit_icl.toy.train import TrainConfig, load_trained, save_trained, train_model

MINI_MODEL = ToyConfig(dim=2, context_length=6, attention_width=8, mlp_width=16, n_heads=2)
MINI_TRAINING = TrainConfig(steps=20, n_checkpoints=2, seed=3)
MINI_STUDY = StudyConfig(
    n_test_prompts=64,
    n_held_out_prompts=16,
    n_full_context_prompts=256,
    n_rank_prompts=16,
    n_gd_identity_prompts=2,
    step_size_grid=(0.01, 0.1),
)


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    out = tmp_path_factory.mktemp("mini")
    trained = train_model(MINI_MODEL, MINI_TRAINING)
    save_trained(trained, out / "model.safetensors")
    return trained, out, run_study(load_trained(out / "model.safetensors"), MINI_STUDY, out)


def test_mini_pipeline_writes_the_report_and_every_metric(mini):
    _, out, metrics = mini
    for stem in ("agreement", "error_vs_k", "increments", "finetune", "alignment", "training"):
        assert (out / f"{stem}.png").stat().st_size > 0 and (out / f"{stem}.svg").stat().st_size > 0
        assert f'src="{stem}.png"' in (out / "index.html").read_text()
    assert "on 64 test prompts" in (out / "index.html").read_text()
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    for key in ("final_test_loss", "error_over_d", "increment_norms", "finetune", "alignment", "checkpoints"):
        assert key in metrics
    for key in ("model_minus_averaging_at_N", "model_minus_one_gd_step_at_N"):
        assert metrics[key]["n_prompts"] == metrics["n_full_context_prompts"] == 256
    assert set(metrics["alignment"]) >= {"trained", "untrained", "shuffled labels", "gap_to_untrained_mean"}
    assert set(metrics["increment_norms"]) == {"trained", "untrained", "shuffled labels"}
    assert metrics["finetune"]["sgd_step_size"]["trained"] in MINI_STUDY.step_size_grid
    assert len(metrics["error_over_d"]["model"]["mean"]) == MINI_MODEL.context_length + 1
    assert metrics["n_checkpoints"] == 3 and metrics["n_test_prompts"] == 64


def test_mini_pipeline_is_exact(mini):
    _, _, metrics = mini
    assert metrics["icl_vs_patched_max_rel_diff"] <= 1e-10
    assert metrics["icl_vs_patched_float32_max_rel_diff"] <= 1e-5
    assert metrics["rank1_sigma_ratio_max"] <= 1e-12
    assert metrics["gd_identity_max_abs_error"] <= 1e-12
    for row in metrics["checkpoints"]:
        assert row["loss_patched"] == pytest.approx(row["loss_with_prompt"], rel=1e-10)


def test_checkpoints_round_trip_bit_for_bit_and_training_is_deterministic(mini, tmp_path):
    trained, out, _ = mini
    loaded = load_trained(out / "model.safetensors")
    assert loaded.config == trained.config and loaded.train == trained.train
    assert loaded.checkpoints.keys() == trained.checkpoints.keys()
    for step, state in trained.checkpoints.items():
        for name, tensor in state.items():
            assert torch.equal(loaded.checkpoints[step][name], tensor)
    again = train_model(MINI_MODEL, MINI_TRAINING)
    assert all(torch.equal(again.final().state_dict()[k], v) for k, v in trained.final().state_dict().items())
    other = train_model(MINI_MODEL, replace(MINI_TRAINING, seed=4))
    assert not torch.equal(
        other.final().state_dict()["blocks.0.mlp.0.weight"], trained.checkpoints[20]["blocks.0.mlp.0.weight"]
    )


def test_missing_checkpoint_and_bad_out_folder_are_refused(tmp_path):
    with pytest.raises(ImplicitICLError, match="no checkpoint file"):
        load_trained(tmp_path / "absent.safetensors")
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    result = CliRunner().invoke(app, ["reproduce", "--quick", "--out", str(afile)])
    assert result.exit_code == 2 and "is a file, not a folder" in result.output


@pytest.fixture(scope="module")
def shipped():
    return load_trained(SHIPPED_CHECKPOINT)


def test_shipped_checkpoint_is_small_and_made_by_the_training_script(shipped):
    assert SHIPPED_CHECKPOINT.stat().st_size <= 1_000_000
    assert shipped.config == DEFAULT_MODEL and shipped.train == DEFAULT_TRAINING
    # Retrain up to the first checkpoint after initialisation with the script's settings and compare
    # (a tolerance, not equality: another thread count sums in another order).
    first = sorted(shipped.checkpoints)[1]
    retrained = train_model(DEFAULT_MODEL, DEFAULT_TRAINING, stop_after=first)
    for step in (0, first):
        for name, tensor in shipped.checkpoints[step].items():
            torch.testing.assert_close(retrained.checkpoints[step][name], tensor, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", [11, 2024])
def test_shipped_model_learns_and_never_beats_least_squares(shipped, seed):
    """At k = N, on 20,000 fresh prompts (tasks the training never drew), the model is below averaging
    beyond the paired bootstrap interval and far below the zero predictor; over every k it is never below
    least squares, the Bayes-optimal estimator, beyond noise."""
    study = StudyConfig(n_test_prompts=500, n_held_out_prompts=1, n_full_context_prompts=20_000, seed=seed)
    sets = evaluation_sets(shipped, study)
    model, noise = shipped.final(), shipped.config.noise
    checks = learning_checks(
        squared_errors(model, sets.test, noise),
        full_context_errors(model, sets.full_context, noise),
        torch.Generator().manual_seed(seed),
    )
    assert checks["n_full_context_prompts"] == 20_000
    assert checks["model_minus_averaging_at_N"]["ci95_high"][0] < 0
    assert checks["model_error_over_d_at_N"] < 0.1 * checks["zero_error_over_d_at_N"]
    assert checks["model_below_least_squares_max_ci95_low"] <= 0
