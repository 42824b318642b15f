"""The README's Python example runs and shows what it says it shows."""

import contextlib
import io
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_reproduces_the_context():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    printed = io.StringIO()
    default = torch.get_default_dtype()
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(blocks[0], "README.md", "exec"), {})
    finally:
        torch.set_default_dtype(default)
    assert float(printed.getvalue().split()[-1]) < 1e-12
