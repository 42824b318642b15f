"""The command line: `implicit-icl COMMAND`. Every command takes --json (one JSON object on stdout)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

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
    out: Path = typer.Option(Path("out/demo"), help="folder for index.html and the figures"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """The seed paper's toy model (shipped checkpoint): its context as an exact rank-1 patch, in seconds."""
    from implicit_icl.toy.reproduce import demo as run_demo

    try:
        summary = run_demo(out)
    except ImplicitICLError as error:
        fail(error)
    emit(summary, as_json, f"toy in-context regression: prompt vs W + ΔW on the query alone — {out / 'index.html'}")


@app.command()
def reproduce(
    quick: bool = typer.Option(False, "--quick", help="use the shipped checkpoint and fewer prompts (≤ 90 s)"),
    out: Path = typer.Option(Path("out/reproduce"), help="folder for index.html, figures and metrics.json"),
    seed: int = typer.Option(0, help="seed of training (full run) and of the test prompts"),
    as_json: bool = typer.Option(False, "--json", help="print the headline metrics as one JSON object"),
) -> None:
    """Reproduce the seed paper's toy experiments end to end: figures, index.html, metrics.json."""
    from implicit_icl.toy.reproduce import headline
    from implicit_icl.toy.reproduce import reproduce as run_reproduce

    try:
        metrics = run_reproduce(out, quick=quick, seed=seed)
    except ImplicitICLError as error:
        fail(error)
    emit(headline(metrics), as_json, f"toy reproduction — {out / 'index.html'}")
