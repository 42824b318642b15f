"""Compiled patches: the chained fit and the shared-context evaluation against plain forward passes."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from timing import llama_style, wall_seconds  # noqa: E402

from implicit_icl.analyses.compile import CompileSettings, fit_patch, record_calibration
from implicit_icl.engine.forward import ForwardInputs, run_model
from implicit_icl.engine.queries import context_logits

LAYERS, WIDTH, VOCAB, CONTEXT, QUERIES = 8, 512, 32_000, 50, 64


def _model():
    return llama_style(LAYERS, WIDTH, 1376, 8, 2, VOCAB, positions=256)


def run(repeats: int = 3) -> list[tuple[str, float, str]]:
    model = _model()
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(0, VOCAB, (CONTEXT,), generator=generator)
    queries = [torch.randint(0, VOCAB, (int(n),), generator=generator) for n in torch.randint(4, 8, (QUERIES,))]
    full = ForwardInputs.padded([torch.cat([context, q]) for q in queries], side="right")

    def forward():
        with torch.no_grad():
            run_model(model, full)

    calibration = record_calibration(model, context, queries)
    fit = lambda: fit_patch(model, calibration, CompileSettings(ridge=10.0))  # noqa: E731
    record = lambda: record_calibration(model, context, queries)  # noqa: E731
    cached = lambda: context_logits(model, context, queries)  # noqa: E731
    forward(), fit(), cached()  # warm-up
    rows = []
    setting = f"Llama-style, {LAYERS} layers, width {WIDTH}, vocab {VOCAB}, context {CONTEXT}, {QUERIES} queries of 4–7"
    for what, function in (
        ("recording the calibration queries / one padded context-ful forward", record),
        ("chained ridge fit (all tokens, full rank) / one padded context-ful forward", fit),
        ("ICL logits through a shared context cache / one padded context-ful forward", cached),
    ):
        ratios = [wall_seconds(function) / wall_seconds(forward) for _ in range(repeats)]
        rows.append((what, statistics.median(ratios), setting))
    return rows
