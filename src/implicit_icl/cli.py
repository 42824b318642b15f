"""The command line: `implicit-icl COMMAND`. Every command takes --json (one JSON object on stdout)."""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console
from rich.table import Table

from implicit_icl.errors import ImplicitICLError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()


@app.callback()
def _group() -> None:
    """Exact implicit weight patches for in-context learning."""


def emit(result: dict, as_json: bool, title: str) -> None:
    """Print a result as one JSON object (--json) or as a table for people."""
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    table = Table(title=title)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, f"{value:.3e}" if isinstance(value, float) else str(value))
    console.print(table)


def fail(error: Exception) -> None:
    """Bad input: one line on stderr, non-zero exit."""
    sys.stderr.write(f"error: {error}\n")
    raise typer.Exit(code=2)


@app.command()
def demo(
    seed: int = typer.Option(0, help="seed of the random block and sequence"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Remove a context by an exact rank-1 weight update and check the identity."""
    from implicit_icl.demo import random_block_check

    try:
        result = random_block_check(seed)
    except ImplicitICLError as error:
        fail(error)
    emit(result, as_json, "context removed by a rank-1 update (float64, random pre-LayerNorm block)")
