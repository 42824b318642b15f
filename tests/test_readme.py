"""The README's Python example runs and shows what it says it shows."""

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("example", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_readme_example_reproduces_the_context(example):
    """Each example ends by printing the patched-vs-context difference; float64, so it must be ~1e-15."""
    printed = io.StringIO()
    default = torch.get_default_dtype()
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(example, "README.md", "exec"), {})
    finally:
        torch.set_default_dtype(default)
    assert float(printed.getvalue().split()[-1]) < 1e-12
