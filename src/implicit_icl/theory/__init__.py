"""The identities of docs/theory.md on plain tensors: exact implicit updates, output-side solvers, dynamics."""

from implicit_icl.theory.dynamics import (
    GradientSteps,
    RankOneSeries,
    apply_factorised,
    consecutive_differences,
    factorised_updates,
    gradient_descent_errors,
    gradient_step_norms,
    gradient_steps,
    increment_norms,
    prefix_updates,
    rank_one_series,
    step_norms,
)
from implicit_icl.theory.low_rank import LowRankUpdate
from implicit_icl.theory.output_side import (
    norm_scale_shift,
    output_rank_one,
    rms_normalize,
    scale_reaching,
    shared_norm_targets,
    shared_scale_fit,
    stable_norm_scale_patch,
    working_norm_scale,
)
from implicit_icl.theory.rank_one import (
    ImplicitUpdate,
    rank_one_update,
    residual_update,
    skip_update,
)

__all__ = [
    "GradientSteps",
    "ImplicitUpdate",
    "LowRankUpdate",
    "RankOneSeries",
    "apply_factorised",
    "consecutive_differences",
    "factorised_updates",
    "gradient_descent_errors",
    "gradient_step_norms",
    "gradient_steps",
    "increment_norms",
    "norm_scale_shift",
    "output_rank_one",
    "prefix_updates",
    "rank_one_series",
    "rank_one_update",
    "residual_update",
    "rms_normalize",
    "scale_reaching",
    "shared_norm_targets",
    "shared_scale_fit",
    "skip_update",
    "stable_norm_scale_patch",
    "step_norms",
    "working_norm_scale",
]
