"""The baselines against the closed forms of docs/experiments.md §3 (Monte Carlo, within a few percent)."""

import pytest
import torch

from implicit_icl.toy import baselines
from implicit_icl.toy.data import sample_prompts

DIM, N, PROMPTS = 4, 16, 40_000


@pytest.fixture(scope="module")
def prompts():
    return sample_prompts(PROMPTS, DIM, N, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def error_over_d(estimator, prompts, k: int) -> float:
    predictions = estimator(prompts.inputs[:, :k], prompts.labels[:, :k], prompts.query)
    return ((predictions - prompts.query_label).pow(2).mean() / prompts.dim).item()


@pytest.mark.parametrize("k", [0, 2, 4, 8, 16])
def test_zero_and_least_squares_match_closed_forms(prompts, k):
    assert error_over_d(baselines.zero, prompts, k) == pytest.approx(1.0, rel=0.03)
    assert error_over_d(baselines.least_squares, prompts, k) == pytest.approx(max(0.0, 1 - k / DIM), abs=0.03)


@pytest.mark.parametrize("k", [2, 4, 8, 16])
def test_averaging_and_one_gd_step_match_closed_forms(prompts, k):
    assert error_over_d(baselines.averaging, prompts, k) == pytest.approx((DIM + 1) / k, rel=0.04)
    assert error_over_d(baselines.gd_one_step, prompts, k) == pytest.approx((DIM + 1) / (k + DIM + 1), rel=0.04)


def test_the_gd_step_size_is_the_best_one(prompts):
    k = 8
    best = baselines.best_gd_step_size(k, DIM, 0.0)

    def error_with(step: float) -> float:
        weights = step * (prompts.labels[:, :k, None] * prompts.inputs[:, :k]).sum(1)
        return ((weights * prompts.query).sum(-1) - prompts.query_label).pow(2).mean().item()

    assert error_with(best) < error_with(0.8 * best)
    assert error_with(best) < error_with(1.2 * best)


def test_three_nearest_neighbours_at_twice_the_dimension_is_in_the_published_range(prompts):
    assert 0.55 < error_over_d(baselines.nearest_neighbours, prompts, 2 * DIM) < 0.75


def test_ridge_is_the_noisy_floor_where_least_squares_spikes():
    noise = 0.5
    noisy = sample_prompts(PROMPTS, DIM, N, noise, torch.Generator().manual_seed(1), torch.float64)
    ridge_at_d = error_over_d(lambda x, y, q: baselines.ridge(x, y, q, noise**2), noisy, DIM)
    least_squares_at_d = error_over_d(baselines.least_squares, noisy, DIM)
    assert ridge_at_d < 0.6 * least_squares_at_d  # double descent: least squares blows up at k = d
    for k in (2, 8, 16):
        ridge = error_over_d(lambda x, y, q: baselines.ridge(x, y, q, noise**2), noisy, k)
        for name, estimator in baselines.all_baselines(noise).items():
            assert ridge <= error_over_d(estimator, noisy, k) * 1.01, name


def test_ridge_without_penalty_is_least_squares(prompts):
    x, y, q = prompts.inputs[:50, :6], prompts.labels[:50, :6], prompts.query[:50]
    torch.testing.assert_close(baselines.ridge(x, y, q, 0.0), baselines.least_squares(x, y, q))
    torch.testing.assert_close(baselines.ridge(x, y, q, 1e-12), baselines.least_squares(x, y, q))
