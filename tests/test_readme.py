"""The Python examples of the README and of docs/ run and show what they say they show."""

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
EXAMPLES = [
    (f"{page.relative_to(ROOT)}:{index}", code)
    for page in PAGES
    for index, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL))
]


def test_the_readme_and_the_usage_page_have_examples():
    assert {name.split(":")[0] for name, _ in EXAMPLES} >= {"README.md", "docs/usage.md"}


@pytest.mark.parametrize("name, example", EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_example_reproduces_the_context(name, example):
    """Each example ends by printing the patched-vs-context difference; float64, so it must be ~1e-15."""
    printed = io.StringIO()
    default = torch.get_default_dtype()
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(example, name, "exec"), {})
    finally:
        torch.set_default_dtype(default)
    assert float(printed.getvalue().split()[-1]) < 1e-12


def test_the_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_bytes()) <= 12_000, "move details to docs/ (docs/index.md lists the pages)"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
        assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to {target}, which is not there"


@pytest.mark.parametrize("page", sorted((ROOT / "docs" / "results").glob("*.md")), ids=lambda page: page.name)
def test_every_results_page_names_what_reproduces_it(page):
    command = r"(^|`)(implicit-icl |python scripts/|make bench)"
    assert re.search(command, page.read_text(), flags=re.M), f"{page.name} names no command"
