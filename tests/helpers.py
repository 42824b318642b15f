"""Helpers several test files share (importable: pytest puts this folder on sys.path)."""

from contextlib import contextmanager
from unittest import mock

import torch


@contextmanager
def float64_softmax():
    """HF's eager attention with its softmax in the model's dtype instead of float32: two layouts of the same
    sequences (padded or not, custom masks) round HF's float32 softmax differently (~1e-7), even in a float64
    model, so float64 exactness across layouts is checked with this."""
    softmax = torch.nn.functional.softmax
    with mock.patch.object(torch.nn.functional, "softmax", lambda x, dim=None, dtype=None, **_: softmax(x, dim=dim)):
        yield
