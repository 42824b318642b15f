"""Run every benchmark module in this folder (bench_*.py) and print its table of ratios.

Each module exposes `run() -> list[tuple[str, float, str]]`: (what, ratio, how it was measured). Ratios are
measured within one run on one machine, so they travel better than seconds do.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def main() -> None:
    console = Console()
    for path in sorted(Path(__file__).parent.glob("bench_*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        table = Table(title=f"{path.stem}: {(module.__doc__ or '').strip().splitlines()[0]}")
        for column in ("measurement", "ratio", "setting"):
            table.add_column(column, justify="right" if column == "ratio" else "left")
        for what, ratio, setting in module.run():
            table.add_row(what, f"{ratio:.3g}×", setting)
        console.print(table)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
