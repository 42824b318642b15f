"""Means with bootstrap confidence intervals over prompts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Estimate:
    """A mean over prompts and its bootstrap 95% interval, one entry per point of a curve: [n_points]."""

    mean: Tensor
    low: Tensor
    high: Tensor
    n_prompts: int

    def to_dict(self) -> dict:
        return {
            "mean": self.mean.tolist(),
            "ci95_low": self.low.tolist(),
            "ci95_high": self.high.tolist(),
            "n_prompts": self.n_prompts,
        }


N_RESAMPLES = 2000  # bootstrap resamples of the real-model studies' intervals


def bootstrap(values: Tensor, generator: torch.Generator, n_resamples: int = 200) -> Estimate:
    """values: [B] or [B, n_points], one row per prompt; resamples prompts with replacement."""
    values = values.double().reshape(values.shape[0], -1)
    n_prompts = values.shape[0]
    resamples = torch.randint(0, n_prompts, (n_resamples, n_prompts), generator=generator)
    counts = torch.zeros(n_resamples, n_prompts, dtype=values.dtype).scatter_add_(
        1, resamples, torch.ones_like(resamples, dtype=values.dtype)
    )
    means = counts @ values / n_prompts  # [R, n_points]
    low, high = means.quantile(torch.tensor([0.025, 0.975], dtype=means.dtype), dim=0)
    return Estimate(values.mean(0), low, high, values.shape[0])


def interval_text(estimate: dict) -> str:
    """One point of `Estimate.to_dict()` as "mean [low, high]"."""
    return f"{estimate['mean'][0]:+.4f} [{estimate['ci95_low'][0]:+.4f}, {estimate['ci95_high'][0]:+.4f}]"
