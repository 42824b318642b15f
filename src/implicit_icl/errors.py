"""The one exception type the library raises for bad input, and the checks that raise it."""

from __future__ import annotations

import torch


class ImplicitICLError(ValueError):
    """Bad input: the message says what is wrong and what to do about it."""


def holds_values(tensor: torch.Tensor) -> bool:
    """False on the meta device, whose tensors have shapes and no values: checks of values skip them, so a
    model on "meta" runs shape-only (the tests' device audit: a tensor made on the CPU would meet it and raise)."""
    return tensor.device.type != "meta"


def check_finite(name: str, tensor: torch.Tensor) -> None:
    # A finite sum means every entry is finite (infinities and NaN propagate): one reduction, no mask.
    if holds_values(tensor) and not tensor.sum().isfinite() and not torch.isfinite(tensor).all():
        raise ImplicitICLError(f"{name} contains NaN or infinite values; check the inputs that produced it")


def check_last_dim(name: str, tensor: torch.Tensor, size: int) -> None:
    if tensor.shape[-1] != size:
        raise ImplicitICLError(
            f"{name} has last dimension {tensor.shape[-1]} but {size} was expected (shape {tuple(tensor.shape)})"
        )


def safe_squared_norm(name: str, vector: torch.Tensor) -> torch.Tensor:
    """||vector||^2 over the last dimension, refusing zeros: every implicit update divides by it.

    vector: [..., n] -> [...]
    """
    squared = torch.linalg.vector_norm(vector, dim=-1).square()  # no temporary the size of the vector
    if holds_values(squared) and (squared == 0).any():
        raise ImplicitICLError(
            f"{name} is a zero vector, so the rank-1 update that divides by its norm does not exist; "
            "use an input whose reference activation is non-zero"
        )
    return squared
