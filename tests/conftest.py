"""Shared test settings: offline, deterministic hypothesis runs in CI."""

import os

import pytest
import torch
from hypothesis import settings
from transformers import OPTConfig, OPTForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The tests run tiny models, which gain nothing from intra-op threads; on a busy 2-core machine the
# threads spin-wait for each other and a tiny forward pass gets ~100x slower (measured: 0.28 s vs 2 ms).
torch.set_num_threads(1)

# CI replays the same examples every run, so a failure there is reproducible; locally hypothesis explores.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def unsupported_model() -> OPTForCausalLM:
    """A tiny model of a family without a spec (OPT), for the "unsupported family" errors."""
    config = OPTConfig(
        vocab_size=97,
        hidden_size=16,
        ffn_dim=20,
        num_hidden_layers=1,
        num_attention_heads=2,
        word_embed_proj_dim=16,
        max_position_embeddings=64,
    )
    return OPTForCausalLM(config).eval()
