"""Every prefix in one pass (analyses/dynamics/prefixes.py) equals the naive loop, one `compute_patch` and one plain forward
pass per prefix; the per-layer series (analyses/dynamics/series.py) equal their dense definitions.

HF's eager attention takes its softmax in float32 even in float64 models, and a custom mask lays out the keys
differently from a plain pass, so float64 results differ at ~1e-7 with HF's softmax; with the softmax in float64
(`float64_softmax`) they agree to 1e-9. Gemma 2/3 also normalise in float32 (1e-5 floor, see
test_hf_families.py). Float32 runs use HF's own arithmetic throughout.
"""

import pytest
import torch
from helpers import float64_softmax
from transformers import AutoModelForCausalLM

from implicit_icl.analyses.dynamics.prefixes import (
    CHUNK_ENTRIES,
    attention_bytes_per_entry,
    chunked,
    copies_layout,
    prefix_logits,
    prefix_patches,
)
from implicit_icl.analyses.dynamics.series import (
    factorised_check,
    gradient_descent_check,
    input_side_names,
    layer_series,
    matrix,
)
from implicit_icl.errors import ImplicitICLError
from implicit_icl.hf import SPECS, compute_patch
from implicit_icl.models.zoo import VOCAB_SIZE, ZOO_CASES, _draw_weights, tiny_config, tiny_model
from implicit_icl.theory import LowRankUpdate, gradient_step_norms

DECODERS = sorted(family for family, spec in SPECS.items() if not spec.encoder)
FLOAT32_NORMS = {"gemma2": 1e-5, "gemma3_text": 1e-5}  # HF normalises in float32 in these, even in float64
NORM_SCALE_FAMILIES = {"gemma2", "gemma3_text", "olmo2"}


def _ids(n: int, q: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB_SIZE, (n,), generator=generator), torch.randint(
        0, VOCAB_SIZE, (q,), generator=generator
    )


def _dense(delta):
    return delta.dense() if isinstance(delta, LowRankUpdate) else delta


@torch.no_grad()
def _plain_logits(model, context, query, prefixes):
    return torch.stack([model(torch.cat([context[:p], query])[None]).logits[0, -1] for p in prefixes])


def _assert_equals_the_loop(model, trajectory, context, query, tolerance, skip_output_side=False):
    """Entry j against compute_patch(context[:p_j], query) and a plain forward pass of that prefix."""
    spec = SPECS[model.config.model_type]
    inputs = {name for layer in range(model.config.num_hidden_layers) for name in input_side_names(model, spec, layer)}
    for entry, p in enumerate(trajectory.prefix_lengths):
        got = trajectory.patch[entry].deltas
        if p == 0:  # no context: the patch is zero up to rounding
            assert all(_dense(got[name]).abs().max() <= tolerance for name in inputs)
            continue
        for name, delta in compute_patch(model, context[:p], query, dtype=trajectory.patch.dtype).deltas.items():
            if skip_output_side and name not in inputs:
                continue
            expected = _dense(delta)
            assert (_dense(got[name]) - expected).abs().max() <= tolerance * (1 + expected.abs().max()), (name, p)
    plain = _plain_logits(model, context, query, trajectory.prefix_lengths)
    assert (trajectory.context_logits - plain).abs().max() <= tolerance
    assert (trajectory.patched_logits - plain).abs().max() <= tolerance
    assert trajectory.max_abs_logit_diff <= tolerance


@pytest.mark.parametrize(("family", "variant"), [case for case in ZOO_CASES if case[0] in DECODERS])
@pytest.mark.parametrize("query_length", [1, 3])
def test_one_pass_equals_the_loop_in_float64(family, variant, query_length):
    model = tiny_model(family, seed=1, variant=variant)
    context, query = _ids(14, query_length, seed=len(family))
    with float64_softmax():
        trajectory = prefix_patches(model, context, query)
        assert trajectory.method == "one pass" and trajectory.chunks == 1 and trajectory.notice is None
        assert trajectory.prefix_lengths == tuple(range(15))
        _assert_equals_the_loop(model, trajectory, context, query, FLOAT32_NORMS.get(family, 1e-9))


@pytest.mark.parametrize("family", DECODERS)
def test_one_pass_equals_the_loop_in_float32_with_hfs_arithmetic(family):
    model = tiny_model(family, seed=2, dtype=torch.float32)
    context, query = _ids(16, 2, seed=3)
    one_pass = prefix_patches(model, context, query, dtype=torch.float32)
    # the norm-scale output patch divides by the normalised MLP output: its float32 rounding is amplified there
    skip = family in NORM_SCALE_FAMILIES
    _assert_equals_the_loop(model, one_pass, context, query, 1e-5, skip_output_side=skip)
    loop = prefix_patches(model, context, query, dtype=torch.float32, method="loop")
    assert loop.method == "loop" and loop.chunks == 17
    for name in ("update_norms", "increment_norms", "alignment", "learning_rates", "gradient_step_norms"):
        a, b = getattr(layer_series(model, one_pass), name), getattr(layer_series(model, loop), name)
        scale = 1 + b.nan_to_num(0).abs().max()
        assert a.isnan().equal(b.isnan()) and ((a - b).nan_to_num(0).abs() <= 1e-5 * scale).all(), name


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text", "mixtral"])
def test_chunks_of_copies_give_the_same_trajectory(family):
    model = tiny_model(family, seed=0)
    context, query = _ids(20, 2, seed=5)
    with float64_softmax():
        whole = prefix_patches(model, context, query, prefix_lengths=[0, 3, 4, 9, 15, 20])
        for chunk_size in (1, 4):
            parts = prefix_patches(model, context, query, prefix_lengths=[0, 3, 4, 9, 15, 20], chunk_size=chunk_size)
            assert parts.chunks == -(-6 // chunk_size)
            for name, delta in whole.patch.deltas.items():
                assert (_dense(parts.patch.deltas[name]) - _dense(delta)).abs().max() <= 1e-9 * (
                    1 + _dense(delta).abs().max()
                )
            assert (parts.patched_logits - whole.patched_logits).abs().max() <= 1e-9
        # a trajectory read at some of its prefixes is the trajectory of those prefixes
        every = prefix_patches(model, context, query)
        some = every.at([0, 3, 4, 9, 15, 20])
        assert some.prefix_lengths == whole.prefix_lengths and some.patch.sources == whole.patch.sources
        for name, delta in whole.patch.deltas.items():
            assert (_dense(some.patch.deltas[name]) - _dense(delta)).abs().max() <= 1e-9 * (
                1 + _dense(delta).abs().max()
            )
        assert (some.patched_logits - whole.patched_logits).abs().max() <= 1e-9
        assert all(
            torch.equal(a, b[[0, 3, 4, 9, 15, 20]]) for a, b in zip(some.mlp_inputs, every.mlp_inputs, strict=True)
        )
    # the memory budget sets the chunks: a chunk of k copies of 2 tokens with longest prefix p holds 2k (p + 2k)
    per_entry = attention_bytes_per_entry(model)
    assert chunked([0, 3, 20], 2, model, 4 * (3 + 4) * per_entry, None) == [[0, 3], [20]]
    assert chunked([0, 3, 20], 2, model, 6 * (20 + 6) * per_entry, None) == [[0, 3, 20]]
    assert chunked([0, 3, 20], 2, model, 1, None) == [[0], [3], [20]]
    # however much memory there is, a chunk's attention stays within CHUNK_ENTRIES query × key entries
    groups = chunked(list(range(2049)), 1, model, 1 << 40, None)
    assert [p for group in groups for p in group] == list(range(2049)) and len(groups) > 1
    assert all(len(group) * (group[-1] + len(group)) <= CHUNK_ENTRIES for group in groups)


def test_the_layout_shows_each_copy_only_its_prefix():
    query = torch.tensor([20, 21])
    inputs, rows = copies_layout([(0, query), (3, query), (5, query)], cached=5)
    visible = inputs.attention_mask[0]  # [6 copy tokens, 5 cached + 6]
    assert inputs.input_ids[0].tolist() == [20, 21, 20, 21, 20, 21]
    assert inputs.position_ids[0].tolist() == [0, 1, 3, 4, 5, 6]
    assert rows.tolist() == [[0, 1], [0, 3], [0, 5]]
    assert visible[3].tolist() == [1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0]  # copy 2 sees c_1..c_3 and itself
    assert visible[0].tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]  # prefix 0: only itself
    assert visible[4].tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 0]  # its first token, not the one after


def _alibi_falcon() -> torch.nn.Module:
    config = tiny_config("falcon", "old")
    config.alibi = True
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    _draw_weights(model, 0)
    return model.double().eval()


def test_families_without_custom_masks_fall_back_to_the_loop_with_a_notice():
    model = _alibi_falcon()
    context, query = _ids(9, 2, seed=1)
    with pytest.warns(UserWarning, match="ALiBi"):
        trajectory = prefix_patches(model, context, query)
    assert trajectory.method == "loop" and "ALiBi" in trajectory.notice
    _assert_equals_the_loop(model, trajectory, context, query, 1e-9)
    with pytest.raises(ImplicitICLError, match="no one-pass dynamics.*ALiBi"):
        prefix_patches(model, context, query, method="one pass")
    logits = prefix_logits(model, context, [(2, query), (9, query[:1])])
    expected = torch.stack(
        [_plain_logits(model, context, query, [2])[0], _plain_logits(model, context, query[:1], [9])[0]]
    )
    assert (logits - expected).abs().max() <= 1e-9


def test_prefix_logits_of_many_queries_equal_plain_passes():
    model = tiny_model("qwen2", seed=3)
    context, _ = _ids(12, 1, seed=2)
    copies = [(p, _ids(1, q, seed=10 + p)[1]) for p, q in [(0, 2), (4, 1), (12, 3), (7, 2)]]
    with float64_softmax():
        expected = torch.cat([_plain_logits(model, context, query, [p]) for p, query in copies])
        for budget in (10**9, 1):  # one pass, or one copy per pass
            assert (prefix_logits(model, context, copies, memory_budget=budget) - expected).abs().max() <= 1e-9


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3", "mixtral"])
def test_series_from_factors_equal_the_dense_definitions(family):
    model = tiny_model(family, seed=4)
    context, query = _ids(12, 2, seed=6)
    trajectory = prefix_patches(model, context, query, prefix_lengths=[0, 1, 2, 5, 8, 12])
    series = layer_series(model, trajectory)
    spec = SPECS[family]
    for layer in range(model.config.num_hidden_layers):
        # the layer's input side as one stacked matrix [P, Σ out, in]
        stacked = torch.cat(
            [_dense(trajectory.patch.deltas[n]).flatten(1, -2) for n in input_side_names(model, spec, layer)], 1
        )
        norms = torch.linalg.matrix_norm(stacked)
        torch.testing.assert_close(series.update_norms[layer], norms, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(
            series.increment_norms[layer], torch.linalg.matrix_norm(stacked.diff(dim=0)), rtol=1e-9, atol=1e-12
        )
        cosine = (stacked * stacked[-1]).sum((-1, -2)) / (norms * norms[-1])
        torch.testing.assert_close(series.alignment[layer, 1:], cosine[1:], rtol=1e-9, atol=1e-12)
        assert series.alignment[layer, 0].isnan()  # no context: no direction
        if spec.experts is not None:
            assert series.gradient_step_norms[layer].isnan().all() and not trajectory.input_side_outputs
            continue
        # the split reads W_0 A_j (+ bias) as the context-ful pass recorded it: the same as the product with W_0
        split = []
        for name in input_side_names(model, spec, layer):
            weight, delta = matrix(model, name), trajectory.patch.deltas[name]
            recorded = trajectory.input_side_outputs[name].double() - delta.U[..., 0]  # W_0 a_j (+ bias)
            product = (delta.V[..., 0] / delta.V[..., 0].pow(2).sum(-1, keepdim=True)) @ weight.T
            torch.testing.assert_close(recorded - recorded[:1], product - product[:1], rtol=1e-9, atol=1e-6)
            split.append(torch.stack(gradient_step_norms(weight, delta)))
        steps, remainders = torch.stack(split).norm(dim=0)
        torch.testing.assert_close(series.gradient_step_norms[layer], steps, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(series.remainder_norms[layer], remainders, rtol=1e-6, atol=1e-9)
    assert series.increment_norms.shape == (model.config.num_hidden_layers, 5)


def test_gradient_descent_view_on_a_relative_position_model_and_an_absolute_one():
    """Llama (RoPE): the first layer's reference never moves, so its increments are pure §6 gradient steps and
    the identity holds to rounding; above it the reference moves and a remainder appears. GPT-2 (absolute
    positions): already the first layer's reference moves with the query's position."""
    context, query = _ids(15, 1, seed=8)
    for family, shared_first in (("llama", True), ("gpt2", False)):
        model = tiny_model(family, seed=0)
        trajectory = prefix_patches(model, context, query)
        series = layer_series(model, trajectory)
        checks = gradient_descent_check(model, trajectory)
        assert all(check["patch_vs_theory"] <= 1e-9 for check in checks)
        assert checks[0]["shared_reference"] is shared_first and not checks[-1]["shared_reference"]
        increments = series.increment_norms[0]
        if shared_first:
            assert checks[0]["gd_identity_max_error"] <= 1e-12
            assert series.remainder_norms[0].max() <= 1e-12 * increments.max()
            torch.testing.assert_close(series.gradient_step_norms[0], increments, rtol=1e-9, atol=0)
        else:
            assert checks[0]["gd_identity_max_error"] is None and series.remainder_norms[0].min() > 1e-3
        assert series.remainder_norms[-1].min() > 1e-3 * series.increment_norms[-1].max()
        # without context the query's MLP input is its reduced one: h_0 = 1 / ||z_0||² from the recorded input
        recorded = torch.stack([layer[0] for layer in trajectory.mlp_inputs])
        torch.testing.assert_close(series.learning_rates[:, 0], 1 / recorded.pow(2).sum(-1), rtol=1e-9, atol=0)


def test_factorised_form_reproduces_the_last_prefix():
    model = tiny_model("qwen3", seed=1)
    context, query = _ids(10, 1, seed=2)
    trajectory = prefix_patches(model, context, query, prefix_lengths=[0, 2, 6, 10])
    for check in factorised_check(model, trajectory):
        assert check["max_relative_error"] <= 1e-9
        assert check["factorised_norm"] > 0 and abs(check["cosine"]) <= 1


def test_weights_stay_bit_for_bit_and_bad_input_is_refused_in_one_line(unsupported_model):
    model = tiny_model("mixtral", seed=0)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    context, query = _ids(8, 2, seed=0)
    prefix_patches(model, context, query, prefix_lengths=[0, 4, 8])
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    cases = [
        (dict(context_ids=torch.tensor([], dtype=torch.long)), "context is empty"),
        (dict(query_ids=torch.tensor([], dtype=torch.long)), "query is empty"),
        (dict(prefix_lengths=[3, 2]), "increase strictly"),
        (dict(prefix_lengths=[0, 9]), r"lie in 0\.\.8"),
        (dict(prefix_lengths=[]), "no prefix lengths"),
        (dict(method="fast"), "unknown method"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(query_ids=[VOCAB_SIZE]), "outside the model's vocabulary"),
    ]
    for change, message in cases:
        arguments = dict(context_ids=context, query_ids=query) | change
        with pytest.raises(ImplicitICLError, match=message) as error:
            prefix_patches(model, **arguments)
        assert "\n" not in str(error.value)
    with pytest.raises(ImplicitICLError, match="encoder"):
        prefix_patches(tiny_model("bert"), context, query)
    with pytest.raises(ImplicitICLError, match="unsupported model family"):
        prefix_patches(unsupported_model, context, query)
    assert matrix(model, "model.layers.0.mlp.gate.weight").dtype == torch.float64
