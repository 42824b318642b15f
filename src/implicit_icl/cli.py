"""The command line: `implicit-icl COMMAND`. Every command takes --json (one JSON object on stdout)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from implicit_icl.errors import ImplicitICLError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="The context of a transformer as an exact weight patch (learning without training). Every command "
    "takes --json: one JSON object on stdout.",
)
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


# Options shared by the commands that take a Hugging Face model, a context and a query (hf.commands.RunOptions).
_MODEL = typer.Option(
    None, "--model", help="a .gguf file, a local Hugging Face directory or a hub name (default: SmolLM2-135M-Instruct)"
)
_CONTEXT = typer.Option(None, help="context text (tokenized with the model's tokenizer)")
_CONTEXT_FILE = typer.Option(None, help="file holding the context text")
_CONTEXT_IDS = typer.Option(None, help='context token ids, e.g. "1 2 3" (models without tokenizer)')
_QUERY_IDS = typer.Option(None, help='query token ids, e.g. "4"')
_DTYPE = typer.Option("float32", help="model dtype: float32, float64 or bfloat16")
_OUTPUT = typer.Option(None, help="output side: down, bias, norm or stable (default: the family's)")
_JSON = typer.Option(False, "--json", help="print one JSON object")


@app.command()
def patch(
    model: str | None = _MODEL,
    context: str | None = _CONTEXT,
    context_file: Path | None = _CONTEXT_FILE,
    context_ids: str | None = _CONTEXT_IDS,
    query: str | None = typer.Option(None, help="query text; the patch is for its last token"),
    query_ids: str | None = _QUERY_IDS,
    drop: str | None = typer.Option(None, help="remove only the context span START:END (default: all of it)"),
    dtype: str = _DTYPE,
    arithmetic: str = typer.Option("float64", help="patch arithmetic: float32 or float64"),
    output: str | None = _OUTPUT,
    save: Path | None = typer.Option(None, help="save the patch (safetensors + JSON) into this folder"),
    peft: Path | None = typer.Option(None, help="also write it as a PEFT LoRA adapter into this folder"),
    as_json: bool = _JSON,
) -> None:
    """The exact weight patch that makes the model without the context act as with it, checked."""
    from implicit_icl.hf.commands import RunOptions, parse_drop, patch_report

    try:
        options = RunOptions(model, dtype, context, context_file, context_ids, query, query_ids, arithmetic, output)
        result = patch_report(options, parse_drop(drop), save, peft)
    except ImplicitICLError as error:
        fail(error)
    if as_json:
        emit(result, as_json, "")
        return
    _print_changes(result["changes"])
    summary = {key: value for key, value in result.items() if key not in ("changes", "modules")}
    summary["layer_max_abs_diffs"] = " ".join(f"{diff:.1e}" for diff in result["layer_max_abs_diffs"])
    emit(summary, as_json, f"{result['family']}: patched without the context vs with it, at the query")


@app.command()
def generate(
    model: str | None = _MODEL,
    context: str | None = _CONTEXT,
    context_file: Path | None = _CONTEXT_FILE,
    context_ids: str | None = _CONTEXT_IDS,
    query: str | None = typer.Option(None, help="query text"),
    query_ids: str | None = _QUERY_IDS,
    max_new_tokens: int = typer.Option(32, help="tokens to generate greedily"),
    dtype: str = _DTYPE,
    arithmetic: str = typer.Option("float32", help="patch arithmetic: float32 or float64"),
    output: str | None = _OUTPUT,
    as_json: bool = _JSON,
) -> None:
    """Greedy generation with the context vs without it under per-token exact patches."""
    from implicit_icl.hf.commands import RunOptions, generate_report

    try:
        options = RunOptions(model, dtype, context, context_file, context_ids, query, query_ids, arithmetic, output)
        result = generate_report(options, max_new_tokens)
    except ImplicitICLError as error:
        fail(error)
    emit(result, as_json, f"{result['family']}: greedy tokens with context vs patched without it")


def _print_changes(changes: list[dict]) -> None:
    table = Table(title="what the patch changes")
    for column in ("layer", "parameter", "kind", "norm"):
        table.add_column(column, justify="right" if column in ("layer", "norm") else "left")
    for row in changes:
        table.add_row(str(row["layer"]), row["parameter"], row["kind"], f"{row['norm']:.3e}")
    console.print(table)
