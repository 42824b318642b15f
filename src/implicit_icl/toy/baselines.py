"""Reference estimators for in-context linear regression (docs/experiments.md §3).

Each takes the first k examples of every prompt — inputs [B, k, d], labels [B, k] — and the queries [B, d],
and returns predictions [B]. With no examples (k = 0) every estimator predicts 0.
"""

from __future__ import annotations

import torch
from torch import Tensor


def zero(inputs: Tensor, labels: Tensor, query: Tensor) -> Tensor:
    return torch.zeros_like(query[:, 0])


def least_squares(inputs: Tensor, labels: Tensor, query: Tensor) -> Tensor:
    """The minimum-norm least-squares fit: Bayes-optimal without label noise."""
    if inputs.shape[1] == 0:
        return zero(inputs, labels, query)
    weights = torch.linalg.pinv(inputs) @ labels.unsqueeze(-1)  # [B, d, 1]
    return (query.unsqueeze(-2) @ weights).reshape(-1)


def ridge(inputs: Tensor, labels: Tensor, query: Tensor, penalty: float) -> Tensor:
    """argmin ||X w − y||² + λ ||w||²; with λ = σ² it is the posterior mean, the noisy floor. λ = 0 falls
    back to least squares."""
    if inputs.shape[1] == 0 or penalty == 0:
        return least_squares(inputs, labels, query)
    gram = inputs.transpose(1, 2) @ inputs + penalty * torch.eye(inputs.shape[2], dtype=inputs.dtype)
    weights = torch.linalg.solve(gram, inputs.transpose(1, 2) @ labels.unsqueeze(-1))
    return (query.unsqueeze(-2) @ weights).reshape(-1)


def averaging(inputs: Tensor, labels: Tensor, query: Tensor) -> Tensor:
    """ŵ = mean_i y_i x_i."""
    if inputs.shape[1] == 0:
        return zero(inputs, labels, query)
    weights = (labels.unsqueeze(-1) * inputs).mean(1)
    return (weights * query).sum(-1)


def nearest_neighbours(inputs: Tensor, labels: Tensor, query: Tensor, neighbours: int = 3) -> Tensor:
    """Mean label of the `neighbours` examples closest to the query (all of them when k is smaller)."""
    if inputs.shape[1] == 0:
        return zero(inputs, labels, query)
    distances = (inputs - query.unsqueeze(1)).pow(2).sum(-1)
    closest = distances.topk(min(neighbours, inputs.shape[1]), dim=1, largest=False).indices
    return labels.gather(1, closest).mean(1)


def best_gd_step_size(k: int, dim: int, noise: float) -> float:
    """The step η minimising E||w − η Xᵀy||² under the prompt prior (w, x ~ N(0, I), noise σ).

    E[XᵀX] = k I and E[(XᵀX)²] = k(k+d+1) I give error d − 2ηkd + η²kd(k+d+1+σ²), minimal at
    η* = 1/(k+d+1+σ²), where the error per dimension is 1 − k/(k+d+1+σ²).
    """
    return 1.0 / (k + dim + 1 + noise**2)


def gd_one_step(inputs: Tensor, labels: Tensor, query: Tensor, noise: float = 0.0) -> Tensor:
    """One gradient step on ½||Xw − y||² from w = 0 with the best step size: ŵ = η* Xᵀy."""
    k, dim = inputs.shape[1], inputs.shape[2]
    if k == 0:
        return zero(inputs, labels, query)
    weights = best_gd_step_size(k, dim, noise) * (labels.unsqueeze(-1) * inputs).sum(1)
    return (weights * query).sum(-1)


def all_baselines(noise: float) -> dict:
    """Name -> estimator(inputs, labels, query), in the order the figures list them. Ridge with λ = σ² is
    listed only with label noise: without it, it is least squares."""
    estimators = {"zero": zero, "least squares": least_squares}
    if noise > 0:
        estimators[f"ridge (λ = σ² = {noise**2:g})"] = lambda x, y, q: ridge(x, y, q, noise**2)
    return estimators | {
        "averaging": averaging,
        "3-NN": nearest_neighbours,
        "one GD step (best η)": lambda x, y, q: gd_one_step(x, y, q, noise),
    }
