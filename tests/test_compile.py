"""Compiled (query-independent) patches: exact where the theory says so, truncation identities, export round trips."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from implicit_icl import Patch
from implicit_icl.analyses.compile import CompileSettings, compile_patch, fit_patch, record_calibration
from implicit_icl.engine.construct import compute_patch
from implicit_icl.engine.forward import ForwardInputs, run_model
from implicit_icl.engine.merge import save_merged
from implicit_icl.engine.queries import ContextPrefix, context_logits, reduced_logits
from implicit_icl.errors import ImplicitICLError
from implicit_icl.models.zoo import VOCAB_SIZE, tiny_model
from implicit_icl.theory import LowRankUpdate
from implicit_icl.theory.least_squares import truncated

FAMILIES = ["llama", "gpt2", "falcon", "phi3", "qwen2", "gpt_neox"]
CONTEXT_LENGTH = 20


def _ids(seed: int, n_queries: int, lengths=(4, 2, 5, 3)):
    g = torch.Generator().manual_seed(seed)
    context = torch.randint(0, VOCAB_SIZE, (CONTEXT_LENGTH,), generator=g)
    queries = [torch.randint(0, VOCAB_SIZE, (lengths[k % len(lengths)],), generator=g) for k in range(n_queries)]
    return context, queries


def _relative_difference(a: LowRankUpdate | torch.Tensor, b: LowRankUpdate | torch.Tensor, scale: float) -> float:
    dense = [x.dense() if isinstance(x, LowRankUpdate) else x for x in (a, b)]
    return float((dense[0] - dense[1]).abs().max()) / scale


def _scale(patch) -> float:
    return max(float((d.dense() if isinstance(d, LowRankUpdate) else d).abs().max()) for d in patch.deltas.values())


# --- queries after one context -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2", "falcon"])
def test_cached_context_and_reduced_runs_equal_plain_forward_passes(family):
    model = tiny_model(family, dtype=torch.float32)
    context, queries = _ids(0, 4, lengths=(1, 4, 3, 6))
    with torch.no_grad():
        full = torch.stack(
            [run_model(model, ForwardInputs.plain(torch.cat([context, q])[None]))[0, -1] for q in queries]
        )
        positions = [CONTEXT_LENGTH + torch.arange(q.numel()) for q in queries]
        alone = torch.stack(
            [
                run_model(model, ForwardInputs.plain(q[None], p[None]))[0, -1]
                for q, p in zip(queries, positions, strict=True)
            ]
        )
    assert (context_logits(model, context, queries, batch_size=3) - full).abs().max() < 1e-5
    assert (reduced_logits(model, queries, CONTEXT_LENGTH, batch_size=3) - alone).abs().max() < 1e-5
    prefix = ContextPrefix(model, context, queries)
    assert torch.equal(prefix.last_logits(), prefix.last_logits())  # the cache is cut back after each call


# --- exactness where the theory says so --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "output"),
    [(f, o) for f in FAMILIES for o in ("down", "bias") if (f, o) != ("phi3", "bias")],  # phi3 bias: llama's wiring
)
def test_one_calibration_query_gives_its_exact_patch(family, output):
    """K = 1, its last token, λ = 0, full rank: every fit is the exact rank-1 patch (docs/theory.md §7)."""
    model = tiny_model(family, dtype=torch.float64)
    context, (query,) = _ids(1, 1, lengths=(5,))
    compiled = compile_patch(
        model, context, [query], CompileSettings(ridge=0.0, tokens="last", output=output), dtype=torch.float64
    )
    exact = compute_patch(model, context, query, output=output)
    assert sorted(compiled.deltas) == sorted(exact.deltas)
    scale = _scale(exact)
    for name, delta in exact.deltas.items():
        assert _relative_difference(compiled.deltas[name], delta, scale) < 1e-10, name
    with compiled.applied(model):
        patched = reduced_logits(model, [query], CONTEXT_LENGTH)
    with torch.no_grad():
        with_context = run_model(model, ForwardInputs.plain(torch.cat([context, query])[None]))[:, -1]
    assert (patched - with_context.float()).abs().max() < 1e-5
    assert (reduced_logits(model, [query], CONTEXT_LENGTH) - with_context.float()).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["llama", "gpt2", "falcon", "olmo2"])
def test_interpolating_every_token_of_a_few_queries_reproduces_each_with_its_context(family):
    """With λ = 0 and fewer fitted tokens than dimensions, the least-squares fit interpolates: fitting every
    token of K queries makes each layer give every one of them its context-ful output, so all K at once
    reproduce the context (float64)."""
    model = tiny_model(family, dtype=torch.float64)
    context, queries = _ids(2, 3, lengths=(4, 2, 5))  # 11 tokens < width 36
    compiled = compile_patch(model, context, queries, CompileSettings(ridge=0.0, tokens="all+first"), torch.float64)
    with torch.no_grad():
        expected = torch.stack(
            [run_model(model, ForwardInputs.plain(torch.cat([context, q])[None]))[0, -1] for q in queries]
        )
        with compiled.applied(model):
            inputs = ForwardInputs.padded(queries, [CONTEXT_LENGTH + torch.arange(q.numel()) for q in queries])
            patched = run_model(model, inputs)[:, -1]
    # OLMo 2's norm normalises in float32 even here, and one shared post-norm scale cannot absorb that per token
    assert (patched - expected).abs().max() < (1e-6 if family == "olmo2" else 1e-8)
    assert compiled.notes["fitted_tokens"] == 11 and compiled.notes["position_offset"] == CONTEXT_LENGTH


# --- rank --------------------------------------------------------------------------------------------------


def test_rank_r_after_the_chain_is_the_svd_truncation_of_the_full_rank_fit():
    model = tiny_model("llama", dtype=torch.float64)
    context, queries = _ids(3, 6)
    calibration = record_calibration(model, context, queries)
    full = fit_patch(model, calibration, CompileSettings(ridge=0.5), torch.float64)
    for rank in (1, 3):
        after = fit_patch(model, calibration, CompileSettings(ridge=0.5, rank=rank, truncation="after"), torch.float64)
        chain = fit_patch(model, calibration, CompileSettings(ridge=0.5, rank=rank), torch.float64)
        for name, delta in full.deltas.items():
            assert after.deltas[name].rank == rank and chain.deltas[name].rank == rank
            expected = truncated(delta, rank)
            assert _relative_difference(after.deltas[name], expected, float(delta.dense().abs().max())) < 1e-10
            left, values, right_t = torch.linalg.svd(delta.dense())  # a second method: the dense SVD
            dense = (left[:, :rank] * values[:rank]) @ right_t[:rank]
            assert (after.deltas[name].dense() - dense).abs().max() < 1e-10 * float(dense.abs().max())
        # in the chain, layer 0's input side sees the same inputs as the full fit, so it is truncated alike;
        # everything after it is fitted against the truncated layers below and differs
        gate = "model.layers.0.mlp.gate_proj.weight"
        assert _relative_difference(chain.deltas[gate], truncated(full.deltas[gate], rank), 1.0) < 1e-10
        down = "model.layers.1.mlp.down_proj.weight"
        assert _relative_difference(chain.deltas[down], after.deltas[down], 1.0) > 1e-6
    # the data-metric rank fit is a different rank-r matrix
    data = fit_patch(model, calibration, CompileSettings(ridge=0.5, rank=2, rank_fit="data"), torch.float64)
    assert all(delta.rank <= 2 for delta in data.deltas.values())


def test_the_subset_of_a_recorded_calibration_is_the_calibration_of_that_subset():
    model = tiny_model("llama", dtype=torch.float64)
    context, queries = _ids(4, 5)
    recorded = record_calibration(model, context, queries)
    settings = CompileSettings(ridge=1.0)
    from_subset = fit_patch(model, recorded, settings, torch.float64, subset=[3, 1])
    direct = compile_patch(model, context, [queries[3], queries[1]], settings, torch.float64)
    scale = _scale(direct)
    assert all(_relative_difference(from_subset.deltas[n], d, scale) < 1e-9 for n, d in direct.deltas.items())


# --- files: save/load, PEFT, merged checkpoint -------------------------------------------------------------


def _compiled_float32(settings: CompileSettings, family: str = "llama"):
    model = tiny_model(family, seed=5, dtype=torch.float32)
    context, queries = _ids(5, 8)
    return model, compile_patch(model, context, queries, settings), _ids(6, 5)[1]


def test_save_load_keeps_the_patch_and_its_fingerprint_refuses_another_model(tmp_path):
    model, patch, new_queries = _compiled_float32(CompileSettings(ridge=2.0, rank=3))
    patch.save(tmp_path)
    loaded = Patch.load(tmp_path)
    assert loaded.notes == json.loads(json.dumps(patch.notes)) and loaded.notes["rank"] == 3
    assert loaded.fingerprint == patch.fingerprint and "query-independent" in repr(loaded)
    with patch.applied(model), torch.no_grad():
        ours = reduced_logits(model, new_queries, CONTEXT_LENGTH)
    with loaded.applied(model), torch.no_grad():
        theirs = reduced_logits(model, new_queries, CONTEXT_LENGTH)
    assert torch.equal(ours, theirs)
    with pytest.raises(ImplicitICLError, match="belongs to another model"):
        with loaded.applied(tiny_model("llama", seed=6, dtype=torch.float32)):
            pass


def test_peft_adapter_loaded_fresh_reproduces_the_compiled_patch(tmp_path):
    peft = pytest.importorskip("peft")
    model, patch, new_queries = _compiled_float32(CompileSettings(ridge=1.0, rank=4))
    patch.to_peft(tmp_path, model)
    with patch.applied(model):
        ours = reduced_logits(model, new_queries, CONTEXT_LENGTH)
    adapted = peft.PeftModel.from_pretrained(tiny_model("llama", seed=5, dtype=torch.float32), tmp_path).eval()
    theirs = reduced_logits(adapted, new_queries, CONTEXT_LENGTH)
    assert (ours - theirs).abs().max() <= 1e-5
    assert (ours - reduced_logits(model, new_queries, CONTEXT_LENGTH)).abs().max() > 1e-2
    full_rank = compile_patch(model, *_ids(5, 8))  # ranks differ by matrix: rank_pattern
    full_rank.to_peft(tmp_path / "full", model)
    config = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    assert config["rank_pattern"] or len({d.rank for d in full_rank.deltas.values()}) == 1


@pytest.mark.parametrize("output", ["down", "bias"])
def test_merged_checkpoint_loaded_by_plain_transformers_reproduces_the_compiled_patch(tmp_path, output):
    settings = (
        CompileSettings(ridge=1.0, rank=4) if output == "down" else CompileSettings(output="bias", input_side=False)
    )
    model, patch, new_queries = _compiled_float32(settings)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    save_merged(model, patch, tmp_path / "merged")
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())  # the user's model untouched
    with patch.applied(model):
        ours = reduced_logits(model, new_queries, CONTEXT_LENGTH)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    assert merged.config.mlp_bias == (output == "bias")
    theirs = reduced_logits(merged, new_queries, CONTEXT_LENGTH)
    assert (ours - theirs).abs().max() <= 1e-5
    assert not any(path.name.startswith(".") for path in tmp_path.iterdir())  # no staging folder left


def test_bias_shifts_that_a_format_cannot_hold_are_refused_naming_the_part(tmp_path):
    model, patch, _ = _compiled_float32(CompileSettings(output="bias", input_side=False))
    with pytest.raises(ImplicitICLError, match=r"model\.layers\.0\.mlp\.down_proj\.bias holds a shift that LoRA"):
        patch.to_peft(tmp_path / "adapter", model)
    falcon, falcon_patch, _ = _compiled_float32(CompileSettings(output="bias", input_side=False), family="falcon")
    if falcon.transformer.h[0].mlp.dense_4h_to_h.bias is None:
        with pytest.raises(ImplicitICLError, match="dense_4h_to_h.bias adds a bias to a module without one"):
            save_merged(falcon, falcon_patch, tmp_path / "merged")
    assert not any(tmp_path.iterdir())


# --- bad input ---------------------------------------------------------------------------------------------


def test_bad_input_is_refused_in_one_line(unsupported_model):
    model = tiny_model("llama", dtype=torch.float32)
    context, queries = _ids(7, 2)
    calibration = record_calibration(model, context, queries)
    cases = [
        (lambda: compile_patch(model, context[:0], queries), "the context is empty"),
        (lambda: compile_patch(model, context, []), "no calibration query given"),
        (lambda: compile_patch(model, context, [queries[0], queries[0][:0]]), "calibration query 1 is empty"),
        (lambda: compile_patch(model, context, [torch.tensor([VOCAB_SIZE])]), "outside the model's vocabulary"),
        (lambda: compile_patch(tiny_model("gemma2"), context, queries, output="bias"), "a bias before that norm"),
        (lambda: compile_patch(tiny_model("mixtral"), context, queries), "routes its MLP through experts"),
        (lambda: compile_patch(tiny_model("bert"), context, queries), "post-LayerNorm encoder"),
        (lambda: compile_patch(unsupported_model, context, queries), "unsupported model family"),
        (lambda: CompileSettings(rank=0), "rank must be ≥ 1"),
        (lambda: CompileSettings(tokens="first"), "tokens must be one of"),
        (lambda: CompileSettings(ridge=-1.0), "ridge multiple must be ≥ 0"),
        (lambda: CompileSettings(input_side=False, output="none"), "changes nothing"),
        (lambda: fit_patch(model, calibration, subset=[5]), "subset must hold query indices"),
        (lambda: compile_patch(model, torch.zeros(130, dtype=torch.long), queries), "at most 128 positions"),
    ]
    for call, message in cases:
        with pytest.raises(ImplicitICLError, match=message) as error:
            call()
        assert "\n" not in str(error.value)


# --- the default model -------------------------------------------------------------------------------------


def test_on_the_default_model_one_calibration_query_reproduces_its_context(default_model):
    """K = 1 exactness on the 30-layer model in float32: the compiled patch is the query's exact patch and
    gives the context-ful logits to float rounding; a second, unseen query is not reproduced exactly."""
    model, tokenizer = default_model.model, default_model.tokenizer
    context = torch.tensor(tokenizer("Q: walk\nA: walked\n\nQ: jump\nA: jumped\n\n")["input_ids"])
    query, other = (torch.tensor(tokenizer(text)["input_ids"]) for text in ("Q: talk\nA:", "Q: look\nA:"))
    compiled = compile_patch(model, context, [query], CompileSettings(ridge=0.0, tokens="last"))
    exact = compute_patch(model, context, query, dtype=torch.float32)
    scale = _scale(exact)
    assert max(_relative_difference(compiled.deltas[n], d, scale) for n, d in exact.deltas.items()) < 1e-4
    with compiled.applied(model):
        patched = reduced_logits(model, [query, other], context.numel())
    with_context = context_logits(model, context, [query, other])
    assert (patched[0] - with_context[0]).abs().max() < 1e-3
    assert (patched[1] - with_context[1]).abs().max() > 1e-2
