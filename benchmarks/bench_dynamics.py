"""Dynamics: the exact patch of every prefix from one pass against a loop of one forward pass per prefix.

The loop is a lower bound for any prefix-by-prefix method: it only runs the model on each prefix and the query
(head on the last token only, `logits_to_keep=1`), computing no patch at all. The one pass computes every
prefix's exact patch of every layer, the context-ful logits of every prefix and the per-layer series (norms,
increments, alignment, the gradient-descent split); "verified" also runs every query alone under its patch.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from implicit_icl.hf.dynamics import prefix_patches
from implicit_icl.hf.dynamics_series import layer_series

LAYERS, WIDTH, CONTEXT, VOCAB = 4, 256, 256, 32_000


def llama_style():
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=688,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2 * CONTEXT,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@torch.no_grad()
def forward_loop(model, context: torch.Tensor, query: torch.Tensor) -> None:
    for p in range(context.numel() + 1):
        ids = torch.cat([context[:p], query])[None]
        model(input_ids=ids, use_cache=False, logits_to_keep=1)


def one_pass(model, context, query, verify: bool) -> None:
    trajectory = prefix_patches(model, context, query, dtype=torch.float32, verify=verify)
    layer_series(model, trajectory)


def run(repeats: int = 3) -> list[tuple[str, float, str]]:
    model = llama_style()
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(0, VOCAB, (CONTEXT,), generator=generator)
    query = torch.randint(0, VOCAB, (1,), generator=generator)
    steps = {
        "loop": lambda: forward_loop(model, context, query),
        "one pass": lambda: one_pass(model, context, query, verify=False),
        "verified": lambda: one_pass(model, context, query, verify=True),
    }
    for step in steps.values():  # warm-up
        step()
    ratios = {"one pass": [], "verified": []}
    for _ in range(repeats):  # back to back, so that load drifting on a shared machine hits all three alike
        seconds = {name: _seconds(step) for name, step in steps.items()}
        for name in ratios:
            ratios[name].append(seconds["loop"] / seconds[name])
    setting = (
        f"Llama-style, {LAYERS} layers, width {WIDTH}, vocab {VOCAB}, n = {CONTEXT} context tokens, 1-token query, "
        f"float32; median of {repeats}"
    )
    return [
        (
            f"loop of {CONTEXT + 1} forward passes / one-pass dynamics (patches, logits, series)",
            statistics.median(ratios["one pass"]),
            setting,
        ),
        ("same, one pass verified (every query alone under its patch)", statistics.median(ratios["verified"]), setting),
    ]


def _seconds(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start
