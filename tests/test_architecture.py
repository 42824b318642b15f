"""The layers of docs/architecture.md: no module imports from a layer above its own."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "implicit_icl"

# Bottom to top; a module may import its own layer's package and any layer listed before it.
LAYERS = [
    {"errors", "atomic", "statistics", "progress"},
    {"theory"},
    {"patch"},
    {"engine"},
    {"models"},
    {"tasks"},
    {"analyses"},
    {"report"},
    {"studies"},
    {"toy"},
    {"explore"},  # below cli, whose `explore` command starts it
    {"hf", "cli"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def part_of(module: str) -> str:
    """'implicit_icl.engine.apply' -> 'engine'; 'implicit_icl' (the package itself) -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every `import implicit_icl...` / `from implicit_icl... import ...`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("implicit_icl"):
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.startswith("implicit_icl")]
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] != "__init__.py")


def test_every_top_level_module_has_a_layer():
    tops = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in MODULES}
    assert tops == set(RANK), f"give these a layer in LAYERS and docs/architecture.md: {tops ^ set(RANK)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_from_a_layer_above(path):
    own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    for module, names in imports_of(path):
        imported = part_of(module)
        if imported == "":  # the package itself: only its version string, never the lazy public API
            assert names == ["__version__"], f"{path.name} imports {names} from implicit_icl"
            continue
        assert RANK[imported] < RANK[own] or imported == own, f"{own} ({path.name}) imports {module}, a layer above"
