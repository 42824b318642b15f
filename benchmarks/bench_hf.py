"""Hugging Face engine: exact patches of a Llama-style model against one context-ful forward pass."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from timing import median_seconds  # noqa: E402

from implicit_icl.hf import compute_patch, every_position_patches  # noqa: E402

LAYERS, WIDTH, CONTEXT = 8, 512, 512


def llama_style() -> LlamaForCausalLM:
    """8 layers, width 512, grouped-query attention, float32, eager attention as in every exactness check."""
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=WIDTH,
        intermediate_size=1376,
        num_hidden_layers=LAYERS,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2 * CONTEXT,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def run() -> list[tuple[str, float, str]]:
    model = llama_style()
    ids = torch.randint(0, model.config.vocab_size, (CONTEXT + 1,), generator=torch.Generator().manual_seed(0))
    setting = f"Llama-style, {LAYERS} layers, width {WIDTH}, {CONTEXT}-token context, float32 model"

    @torch.no_grad()
    def forward():
        model(ids[None], use_cache=False)

    one_forward = median_seconds(forward, repeats=5, warmup=1)
    query = median_seconds(lambda: compute_patch(model, ids[:-1], ids[-1:], dtype=torch.float32), 5, 1)
    every = median_seconds(lambda: every_position_patches(model, ids, dtype=torch.float32), 3, 1)
    return [
        ("exact patch for the query / one context-ful forward", query / one_forward, setting),
        (f"all {CONTEXT + 1} every-position patches / one forward", every / one_forward, setting),
    ]
