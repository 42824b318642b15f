"""The whole reproduction: the measurements of `experiments` and `finetune` on a trained toy model,
turned into figures, index.html and metrics.json."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from implicit_icl.statistics import bootstrap
from implicit_icl.theory import increment_norms
from implicit_icl.toy import experiments
from implicit_icl.toy.data import Prompts, sample_prompts
from implicit_icl.toy.finetune import choose_step_size, finetune
from implicit_icl.toy.model import ToyTransformer
from implicit_icl.toy.train import TrainedModel

F64 = torch.float64


@dataclass(frozen=True)
class StudyConfig:
    """How many prompts each measurement uses, and the SGD step-size grid of experiment (c)."""

    n_test_prompts: int = 1000  # every curve point: error vs k, agreement, increments, fine-tuning, alignment
    n_held_out_prompts: int = 256  # separate tasks, only to pick the SGD step size
    n_full_context_prompts: int = 20_000  # separate tasks, error at k = N only: model vs averaging, paired
    n_gd_identity_prompts: int = 8  # the GD identity check builds dense matrices
    n_rank_prompts: int = 256
    step_size_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)
    seed: int = 0


@dataclass(frozen=True)
class EvaluationSets:
    test: Prompts
    held_out: Prompts  # only for choosing the SGD step size
    shuffled: Prompts  # the test prompts with labels permuted within each prompt
    full_context: Prompts  # only for the errors at k = N, where close estimators need many prompts


def evaluation_sets(trained: TrainedModel, study: StudyConfig) -> EvaluationSets:
    """Prompts from a generator seeded apart from training's, so no training task is reused."""
    config = trained.config
    generator = torch.Generator().manual_seed(10_000 + study.seed)

    def sample(n: int) -> Prompts:
        return sample_prompts(n, config.dim, config.context_length, config.noise, generator)

    test, held_out = sample(study.n_test_prompts), sample(study.n_held_out_prompts)
    shuffled = test.shuffled_labels(generator)
    return EvaluationSets(test, held_out, shuffled, sample(study.n_full_context_prompts))


def checkpoint_agreement(trained: TrainedModel, prompts: Prompts) -> list[dict]:
    """Experiment (a) at every checkpoint, in float64."""
    return [
        {"step": step, **experiments.patch_agreement(trained.model_at(step, F64), prompts.to(F64))}
        for step in trained.checkpoints
    ]


def exactness(trained: TrainedModel, sets: EvaluationSets, study: StudyConfig) -> dict:
    """Rank of ΔW and the gradient-descent identity on the final model in float64; its float32 agreement."""
    model = trained.final(F64)
    test = sets.test.to(F64)
    return {
        "icl_vs_patched_float32_max_rel_diff": experiments.patch_agreement(trained.final(), sets.test)["max_rel_diff"],
        "rank1_sigma_ratio_max": experiments.rank_one_sigma_ratio(model, test.subset(slice(study.n_rank_prompts))),
        "gd_identity_max_abs_error": experiments.gd_identity_error(
            model.first_block(), test.subset(slice(study.n_gd_identity_prompts))
        ),
        "gd_identity_prompts": min(study.n_gd_identity_prompts, test.size),
    }


def dynamics(model: ToyTransformer, untrained: ToyTransformer, sets: EvaluationSets, study: StudyConfig) -> dict:
    """Experiments (b)-(d), each next to its negative controls: the untrained model, shuffled labels.

    The SGD step size of each model is chosen on the held-out tasks (`choose_step_size`); the shuffled
    control reuses the trained model's.
    """
    generator = torch.Generator().manual_seed(study.seed)
    grid = list(study.step_size_grid)
    chosen = {
        name: choose_step_size(m.first_block(), sets.held_out, grid)
        for name, m in [("trained", model), ("untrained", untrained)]
    }
    conditions = [
        ("trained", model, sets.test, "trained"),
        ("untrained", untrained, sets.test, "untrained"),
        ("shuffled labels", model, sets.shuffled, "trained"),
    ]
    result: dict = {
        "step_size": {name: eta for name, (eta, _) in chosen.items()},
        "step_size_scores": {name: scores for name, (_, scores) in chosen.items()},
    }
    result |= {"increments": {}, "alignment": {}}
    for name, m, prompts, step_from in conditions:
        block = m.first_block()
        update = experiments.prefix_update(block, prompts)
        run = finetune(block, prompts, chosen[step_from][0], update.weight)
        result["increments"][name] = bootstrap(increment_norms(update.weight), generator)
        result["alignment"][name] = bootstrap(run.alignment, generator)
        if name == "trained":
            implicit = experiments.patched_prefix_predictions(block, prompts, update)
            result["implicit_loss"] = bootstrap((implicit - prompts.query_label[:, None]).pow(2), generator)
            result["finetune_loss"] = bootstrap(run.test_loss, generator)
    return result


def error_curves(trained: TrainedModel, sets: EvaluationSets, study: StudyConfig) -> dict[str, Tensor]:
    """Per-prompt error/d over k = 0..N of the final model and every baseline: [B, N+1] each."""
    return experiments.squared_errors(trained.final(), sets.test, trained.config.noise)


def full_context_errors(trained: TrainedModel, sets: EvaluationSets) -> dict[str, Tensor]:
    """Per-prompt error/d at k = N of the final model and every baseline on the many full-context prompts."""
    return experiments.full_context_errors(trained.final(), sets.full_context, trained.config.noise)


def learning_checks(errors: dict[str, Tensor], full_context: dict[str, Tensor], generator: torch.Generator) -> dict:
    """The honesty checks of docs/experiments.md §4, paired over prompts with bootstrap 95% intervals.

    full_context: error/d at k = N ([B'] per estimator, many prompts): the model minus averaging must be < 0,
    and the model minus one GD step is reported. errors: the curves ([B, N+1]): least squares minus the
    model at every k must not be > 0 beyond noise (the model would beat the Bayes-optimal estimator: a leak).
    """
    gd = "one GD step (best η)"
    under_least_squares = bootstrap(errors["least squares"] - errors["model"], generator)
    return {
        "n_full_context_prompts": full_context["model"].shape[0],
        **{f"{_key(name)}_error_over_d_at_N": values.mean().item() for name, values in full_context.items()},
        "model_minus_averaging_at_N": bootstrap(full_context["model"] - full_context["averaging"], generator).to_dict(),
        "model_minus_one_gd_step_at_N": bootstrap(full_context["model"] - full_context[gd], generator).to_dict(),
        "model_below_least_squares_max": under_least_squares.mean.max().item(),
        "model_below_least_squares_max_ci95_low": under_least_squares.low.max().item(),
    }


def _key(estimator: str) -> str:
    """'one GD step (best η)' -> 'one_gd_step', '3-NN' -> '3_nn': metric names from estimator names."""
    return estimator.split(" (")[0].lower().replace(" ", "_").replace("-", "_")
