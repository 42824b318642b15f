"""Dynamics: the exact patch of every prefix from one pass against a loop of one forward pass per prefix.

The loops compute no patch at all, so they bound any prefix-by-prefix method from below: the plain loop is HF's
default forward of each prefix and the query (logits at every position), the lean loop keeps the head on the
last token only (`logits_to_keep=1`). The one pass computes every prefix's exact patch of every layer, the
context-ful logits of every prefix and the per-layer series (norms, increments, alignment, the gradient-descent
split); "verified" also runs every query alone under its patch. By a FLOP count the lean loop costs ~n²/2
tokens and the one pass ~2n tokens (context and copies) plus the reduced pass's MLP input matrices and the
head on n + 1 rows, so at n = 256 and equal speed per multiply-add the lean ratio would be ~45 with a small
vocabulary, less with a large one (the one pass's larger matrix products run faster per multiply-add, so it can
measure above that).
"""

from __future__ import annotations

import resource
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from timing import llama_style, median_seconds, wall_seconds  # noqa: E402

from implicit_icl.analyses.dynamics.prefixes import context_cache, prefix_patches
from implicit_icl.analyses.dynamics.series import layer_series

LAYERS, WIDTH, CONTEXT = 4, 256, 256


def model_of(vocab_size: int):
    return llama_style(LAYERS, WIDTH, 688, 4, 4, vocab_size, positions=2 * CONTEXT)


@torch.no_grad()
def forward_loop(model, context: torch.Tensor, query: torch.Tensor, lean: bool) -> None:
    """One forward pass per prefix: plain (HF's default, logits at every position) or lean (last token only)."""
    for p in range(context.numel() + 1):
        ids = torch.cat([context[:p], query])[None]
        model(input_ids=ids, use_cache=False, logits_to_keep=1 if lean else 0)


@torch.no_grad()
def forward_once(model, ids: torch.Tensor) -> None:
    """HF's default forward of the whole context and the query: the unit the other costs are counted in."""
    model(input_ids=ids, use_cache=False)


def one_pass(model, context, query, verify: bool) -> None:
    trajectory = prefix_patches(model, context, query, dtype=torch.float32, verify=verify)
    layer_series(model, trajectory)


def inputs_of(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The benchmark's random context [CONTEXT] and one-token query [1] (seed 0)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (CONTEXT,), generator=generator), torch.randint(0, vocab, (1,), generator=generator)


def ratios(vocab: int, repeats: int) -> list[tuple[str, float, str]]:
    """Each repeat times the loops and the one pass back to back (load drifting on a shared machine hits them
    alike); the median of the per-repeat ratios."""
    model = model_of(vocab)
    context, query = inputs_of(vocab)
    whole = torch.cat([context, query])[None]
    steps = {
        "one forward": lambda: forward_once(model, whole),
        "plain loop": lambda: forward_loop(model, context, query, lean=False),
        "lean loop": lambda: forward_loop(model, context, query, lean=True),
        "one pass": lambda: one_pass(model, context, query, verify=False),
        "verified": lambda: one_pass(model, context, query, verify=True),
    }
    for step in steps.values():  # warm-up
        step()
    seconds = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            seconds[name].append(wall_seconds(step))
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(seconds[a], seconds[b], strict=True))  # noqa: E731
    setting = (
        f"Llama-style, {LAYERS} layers, width {WIDTH}, vocab {vocab}, n = {CONTEXT}, 1-token query, float32, "
        f"{torch.get_num_threads()} threads; median of {repeats}"
    )
    return [
        ("plain loop (HF forward per prefix) / one-pass dynamics", ratio("plain loop", "one pass"), setting),
        ("lean loop (head on the last token) / one-pass dynamics", ratio("lean loop", "one pass"), setting),
        ("lean loop / one-pass dynamics, verified", ratio("lean loop", "verified"), setting),
        ("plain loop / one forward of the n + 1 tokens", ratio("plain loop", "one forward"), setting),
        ("one-pass dynamics / one forward of the n + 1 tokens", ratio("one pass", "one forward"), setting),
    ]


def chunk_ratio(repeats: int = 7, context_length: int = 1_024) -> list[tuple[str, float, str]]:
    """A long context: all copies in one pass against the default chunks, whose cache is cropped to each
    chunk's longest prefix (median of per-repeat ratios, as above; more repeats, as three drift by ±20%)."""
    model = llama_style(LAYERS, WIDTH, 688, 4, 4, 1_024, positions=2 * context_length + 2)
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(0, 1_024, (context_length,), generator=generator)
    query = torch.randint(0, 1_024, (1,), generator=generator)
    settings = {"one chunk": dict(chunk_size=context_length + 1), "default": {}}
    passes = {
        name: lambda kw=kw: prefix_patches(model, context, query, dtype=torch.float32, verify=False, **kw)
        for name, kw in settings.items()
    }
    chunks = passes["default"]().chunks  # also the warm-up
    passes["one chunk"]()
    seconds = {name: [wall_seconds(step) for _ in range(repeats)] for name, step in passes.items()}
    ratio = statistics.median(a / b for a, b in zip(seconds["one chunk"], seconds["default"], strict=True))
    setting = f"same model, vocab 1,024, n = {context_length}: {chunks} chunks; median of {repeats}"
    return [("one-pass dynamics, all copies in one pass / in the default chunks", ratio, setting)]


def phases(vocab: int = 1_024, repeats: int = 15) -> dict[str, float]:
    """The one pass by phase, in forwards of the n + 1 tokens (medians of `repeats`), and the minor page faults
    of one whole pass (the loop's are counted too): what `python benchmarks/bench_dynamics.py` prints."""
    model = model_of(vocab)
    context, query = inputs_of(vocab)
    patches = lambda: prefix_patches(model, context, query, dtype=torch.float32, verify=False)  # noqa: E731
    trajectory = patches()
    forward = median_seconds(lambda: forward_once(model, torch.cat([context, query])[None]), repeats)
    steps = {
        "context cache": lambda: context_cache(model, context),
        "prefix_patches (context, copies, reduced step)": patches,
        "layer_series": lambda: layer_series(model, trajectory),
    }
    report = {f"{name} (forwards)": median_seconds(step, repeats) / forward for name, step in steps.items()}
    for name, step in (
        ("one pass", lambda: one_pass(model, context, query, verify=False)),
        ("plain loop", lambda: forward_loop(model, context, query, lean=False)),
    ):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        report[f"{name} (minor page faults)"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return report


def run(repeats: int = 3) -> list[tuple[str, float, str]]:
    return ratios(32_000, repeats) + ratios(1_024, repeats) + chunk_ratio()


if __name__ == "__main__":  # the vocab-1,024 ratios of one run, then the one pass phase by phase
    for what, ratio, _ in ratios(1_024, repeats=5):
        print(f"{ratio:6.1f}×  {what}")
    for what, value in phases().items():
        print(f"{value:8.2f}  {what}")
