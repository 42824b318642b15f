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
    toy: bool = typer.Option(False, "--toy", help="the seed paper's toy model instead (shipped checkpoint, ~10 s)"),
    eval_task: list[str] | None = typer.Option(None, "--eval-task", help="task of the short evaluation (repeatable)"),
    eval_prompts: int = typer.Option(20, help="prompts per task in the short evaluation"),
    new_tokens: int = typer.Option(8, help="tokens to generate greedily, with the context and patched"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """A few-shot prompt on the default model as an exact weight patch, checked every way; --toy: the toy model."""
    if toy:
        from implicit_icl.toy.reproduce import demo as run_toy_demo

        try:
            summary = run_toy_demo(out)
        except ImplicitICLError as error:
            fail(error)
        emit(summary, as_json, f"toy in-context regression: prompt vs W + ΔW on the query alone — {out / 'index.html'}")
        return
    from implicit_icl.studies.demo.report import print_demo
    from implicit_icl.studies.demo.run import EVAL_TASKS, DemoSettings, headline, run_demo

    try:
        settings = DemoSettings(tuple(eval_task or EVAL_TASKS), eval_prompts, new_tokens=new_tokens)
        result = run_demo(out, settings)
    except ImplicitICLError as error:
        fail(error)
    if as_json:
        emit(headline(result), as_json, "")
        return
    print_demo(console, result, out)


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


# Options shared by the commands that take a Hugging Face model, a context and a query (models.options.RunOptions).
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
    from implicit_icl.cli.patch import patch_report
    from implicit_icl.models.options import RunOptions, parse_drop

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
    from implicit_icl.cli.patch import generate_report
    from implicit_icl.models.options import RunOptions

    try:
        options = RunOptions(model, dtype, context, context_file, context_ids, query, query_ids, arithmetic, output)
        result = generate_report(options, max_new_tokens)
    except ImplicitICLError as error:
        fail(error)
    emit(result, as_json, f"{result['family']}: greedy tokens with context vs patched without it")


@app.command()
def evaluate(
    model: str | None = _MODEL,
    task: list[str] | None = typer.Option(None, "--task", help="a built-in task (repeatable); 'all' for every one"),
    task_file: list[Path] | None = typer.Option(None, "--task-file", help="a JSON task file (repeatable)"),
    shots: int = typer.Option(5, help="demonstrations per prompt"),
    n: int = typer.Option(100, "--n", help="prompts per task"),
    seed: int = typer.Option(0, help="seed of the prompts and of the bootstrap"),
    dtype: str = _DTYPE,
    batch_size: int = typer.Option(16, help="prompts per forward pass"),
    first_token_only: bool = typer.Option(False, "--first-token-only", help="skip greedy whole answers"),
    out: Path | None = typer.Option(None, help="folder for index.html, metrics.json and the figure"),
    as_json: bool = _JSON,
) -> None:
    """Zero-shot vs in-context vs the query alone under its exact patch, per task, with bootstrap intervals."""
    from implicit_icl.models.options import RunOptions
    from implicit_icl.studies.evaluate.report import print_evaluation
    from implicit_icl.studies.evaluate.run import run_evaluation
    from implicit_icl.studies.evaluate.scores import EvaluationSettings

    try:
        RunOptions(model, dtype)  # checks --dtype before anything loads
        settings = EvaluationSettings(shots, n, seed, batch_size, whole_answers=not first_token_only)
        result = run_evaluation(model, dtype, task or [], task_file or [], settings, out)
    except ImplicitICLError as error:
        fail(error)
    if as_json:
        emit(result, as_json, "")
        return
    print_evaluation(console, result)
    if out is not None:
        console.print(f"report: {out / 'index.html'}")


@app.command()
def dynamics(
    model: str | None = _MODEL,
    context: str | None = _CONTEXT,
    context_file: Path | None = _CONTEXT_FILE,
    context_ids: str | None = _CONTEXT_IDS,
    query: str | None = typer.Option(None, help="query text; the patches are for its last token"),
    query_ids: str | None = _QUERY_IDS,
    target: str | None = typer.Option(None, help="answer text whose first token is followed (mind its leading space)"),
    target_id: int | None = typer.Option(None, help="the followed answer token's id, instead of --target"),
    task: str | None = typer.Option(None, "--task", help="a built-in task: per-demonstration study with controls"),
    task_file: Path | None = typer.Option(None, "--task-file", help="a JSON task file, instead of --task"),
    shots: int = typer.Option(8, help="demonstrations per prompt (task mode)"),
    n: int = typer.Option(1, "--n", help="prompts of the per-demonstration study (task mode)"),
    seed: int = typer.Option(0, help="seed of the prompts, the untrained model and the bootstrap"),
    dtype: str = _DTYPE,
    arithmetic: str = typer.Option("float64", help="patch arithmetic: float32 or float64"),
    finetune: bool = typer.Option(False, "--finetune", help="also compare with SGD fine-tuning (task mode; slower)"),
    finetune_prompts: int = typer.Option(8, help="prompts of the fine-tuning comparison (at most --n)"),
    step_size: float | None = typer.Option(None, help="SGD step size (default: chosen on separate prompts)"),
    factorised: bool = typer.Option(False, "--factorised", help="also check the factorised form per layer"),
    out: Path | None = typer.Option(None, help="folder for index.html, dynamics.json and the figures"),
    as_json: bool = _JSON,
) -> None:
    """The exact patch of every prefix of a context from one pass: norms, increments, convergence, controls."""
    from implicit_icl.models.options import RunOptions
    from implicit_icl.studies.dynamics.run import DynamicsSettings, headline, run_dynamics

    try:
        options = RunOptions(model, dtype, context, context_file, context_ids, query, query_ids)
        settings = DynamicsSettings(
            shots, n, seed, arithmetic, finetune, finetune_prompts, step_size=step_size, factorised=factorised
        )
        result = run_dynamics(options, task, task_file, target, target_id, settings, out)
    except ImplicitICLError as error:
        fail(error)
    emit(result if as_json else headline(result), as_json, f"{result['family']}: every prefix in one pass")


@app.command(name="compile")
def compile_context(
    model: str | None = _MODEL,
    task: str | None = typer.Option(None, "--task", help="a built-in task: its demonstrations are the context"),
    task_file: Path | None = typer.Option(None, "--task-file", help="a JSON task file, like --task"),
    context: str | None = typer.Option(None, help="context text (with --calibration)"),
    context_file: Path | None = _CONTEXT_FILE,
    context_ids: str | None = _CONTEXT_IDS,
    calibration: Path | None = typer.Option(None, help="JSON list of queries (text, ids or {query, answer})"),
    shots: int = typer.Option(5, help="demonstrations in the context (task mode)"),
    calibration_size: int = typer.Option(64, help="calibration queries the patch is fitted on"),
    rank: int | None = typer.Option(None, help="truncate every matrix delta to this rank (default: full)"),
    ridge: float | None = typer.Option(None, help="λ as a multiple of trace(ZZᵀ)/dim (default: chosen on dev)"),
    tokens: str | None = typer.Option(None, help="fitted tokens: all, last or all+first (default: chosen on dev)"),
    n: int = typer.Option(50, "--n", help="held-out queries"),
    dev: int = typer.Option(16, help="dev queries (choose λ, tokens and the baselines' layers and heads)"),
    seed: int = typer.Option(0, help="seed of the demonstrations and of the split"),
    dtype: str = _DTYPE,
    save: Path | None = typer.Option(None, help="save the compiled patch (safetensors + JSON) into this folder"),
    peft: Path | None = typer.Option(None, help="write it as a PEFT LoRA adapter into this folder"),
    merged: Path | None = typer.Option(None, help="write a merged checkpoint (save_pretrained) into this folder"),
    out: Path | None = typer.Option(None, help="folder for index.html (with curves), metrics.json and figures"),
    as_json: bool = _JSON,
) -> None:
    """Compile a context into one query-independent patch; compare it with ICL, task and function vectors."""
    from implicit_icl.models.options import RunOptions
    from implicit_icl.studies.compile.methods import StudySettings
    from implicit_icl.studies.compile.run import Source, compile_command

    try:
        RunOptions(model, dtype)  # checks --dtype before anything loads
        settings = StudySettings(shots, calibration_size, dev, n, seed, rank, ridge, tokens)
        source = Source(task, task_file, context, context_ids, calibration, context_file)
        result = compile_command(model, dtype, source, settings, save, peft, merged, out)
    except ImplicitICLError as error:
        fail(error)
    if as_json:
        emit(result, as_json, "")
        return
    shown = {k: v for k, v in result.items() if not isinstance(v, dict | list)}
    emit(shown, as_json, f"{result['task']}: compiled patch vs ICL, task and function vectors (held-out queries)")


@app.command()
def explore(
    model: str | None = _MODEL,
    dtype: str = _DTYPE,
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0 shares the explorer on the network)"),
    port: int = typer.Option(8765, help="port to listen on"),
    no_browser: bool = typer.Option(False, "--no-browser", help="only print the URL; do not open a browser"),
) -> None:
    """An interactive explorer in the browser: every prefix's patch, the whole patch, compiled patches."""
    from implicit_icl.explore.server import bound_socket, serve
    from implicit_icl.models.load import load_model
    from implicit_icl.models.options import RunOptions

    try:
        RunOptions(model, dtype)  # checks --dtype before anything loads
        bound_socket(host, port).close()  # a taken port fails before the model loads
        serve(load_model(model, dtype), host, port, open_browser=not no_browser)
    except ImplicitICLError as error:
        fail(error)


def _print_changes(changes: list[dict]) -> None:
    table = Table(title="what the patch changes")
    for column in ("layer", "parameter", "kind", "norm"):
        table.add_column(column, justify="right" if column in ("layer", "norm") else "left")
    for row in changes:
        table.add_row(str(row["layer"]), row["parameter"], row["kind"], f"{row['norm']:.3e}")
    console.print(table)
