"""Task vectors and function vectors: their batched, cached machinery against plain one-at-a-time forward passes."""

import pytest
import torch

from implicit_icl.analyses.baselines import (
    DevQueries,
    DevScores,
    dev_scores,
    function_vector,
    head_vector,
    indirect_effects,
    last_token_edit,
    last_token_states,
    mean_head_outputs,
    task_vector,
)
from implicit_icl.engine.forward import ForwardInputs, run_model
from implicit_icl.engine.queries import ContextPrefix, reduced_logits
from implicit_icl.errors import ImplicitICLError
from implicit_icl.models.zoo import VOCAB_SIZE, tiny_model

CONTEXT_LENGTH = 18


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=3, dtype=torch.float32, variant="tied")  # 3 layers, biases everywhere


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    context = torch.randint(0, VOCAB_SIZE, (CONTEXT_LENGTH,), generator=g)
    queries = tuple(torch.randint(0, VOCAB_SIZE, (n,), generator=g) for n in (3, 1, 4, 2, 5))
    answers = torch.randint(0, VOCAB_SIZE, (len(queries),), generator=g)
    return context, DevQueries(queries, answers, CONTEXT_LENGTH)


def test_queries_alone_with_repeats_equal_plain_runs(model):
    _, dev = _data()
    prefix = ContextPrefix(model, torch.zeros(0, dtype=torch.long), dev.queries, repeats=3, start=CONTEXT_LENGTH)
    logits = prefix.last_logits().reshape(len(dev.queries), 3, -1)
    plain = reduced_logits(model, dev.queries, CONTEXT_LENGTH)
    assert (logits - plain[:, None]).abs().max() < 1e-5


def test_batched_dev_scores_equal_one_candidate_at_a_time(model):
    _, dev = _data()
    g = torch.Generator().manual_seed(1)
    edits = [(layer, torch.randn(36, generator=g)) for layer in (0, 2, 1, 2)]
    for replace in (True, False):
        batched = dev_scores(model, dev, edits, replace, max_rows=12)  # 2 candidates per pass
        for (layer, vector), score in zip(edits, batched, strict=True):
            with last_token_edit(model, layer, vector, replace):
                alone = DevScores.of(reduced_logits(model, dev.queries, dev.offset), dev.answers)
            assert score.accuracy == alone.accuracy and score.log_prob == pytest.approx(alone.log_prob, abs=1e-4)


def test_task_vector_states_are_hf_hidden_states_and_the_best_dev_layer_is_chosen(model):
    context, dev = _data()
    states = last_token_states(model, context, dev.queries[:2])
    with torch.no_grad():
        hidden = model(torch.cat([context, dev.queries[0]])[None], output_hidden_states=True).hidden_states
    for layer in range(3):  # hidden_states[l] enters layer l (the last entry is after the final norm)
        assert (states[layer, 0] - hidden[layer][0, -1]).abs().max() < 1e-5
    vector = task_vector(model, states.mean(1), dev)
    assert set(vector.dev_scores) == {1, 2}
    assert vector.dev_scores[vector.layer].key == max(score.key for score in vector.dev_scores.values())
    seen = {}
    module = model.model.layers[vector.layer]
    with vector.applied(model):  # pre-hooks run in order: this one sees the edited state
        handle = module.register_forward_pre_hook(
            lambda m, a, k: seen.update(h=k.get("hidden_states", a and a[0])), with_kwargs=True
        )
        reduced_logits(model, dev.queries[:1], dev.offset)
    handle.remove()
    assert torch.equal(seen["h"][0, -1], vector.vector)


def test_head_outputs_sum_to_the_attention_output(model):
    """One prompt's per-head vectors, mapped through their slices of o_proj, add up to the attention output
    (less o_proj's bias): the head slicing is the model's own."""
    context, dev = _data()
    means = mean_head_outputs(model, context, dev.queries[:1])
    assert means.shape == (3, 6, 6)
    recorded = {}
    attention = model.model.layers[1].self_attn.o_proj
    handle = attention.register_forward_hook(lambda m, a, out: recorded.update(out=out[0, -1]))
    with torch.no_grad():
        run_model(model, ForwardInputs.plain(torch.cat([context, dev.queries[0]])[None]))
    handle.remove()
    summed = head_vector(model, means, [(1, head) for head in range(6)])
    assert (summed + attention.bias.detach() - recorded["out"]).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["gemma3_text", "olmo2"])
def test_head_outputs_through_a_post_attention_norm_sum_to_what_joins_the_residual_stream(family):
    """Behind a post-attention norm, one prompt's heads of a layer, mapped through the norm linearised at their
    own sum, give the norm's output exactly: what the attention adds to the residual stream."""
    tiny = tiny_model(family, seed=1, dtype=torch.float32)
    context, dev = _data()
    means = mean_head_outputs(tiny, context, dev.queries[:1])
    recorded = {}
    norm = tiny.model.layers[1].post_attention_layernorm
    handle = norm.register_forward_hook(lambda m, a, out: recorded.update(out=out[0, -1]))
    with torch.no_grad():
        run_model(tiny, ForwardInputs.plain(torch.cat([context, dev.queries[0]])[None]))
    handle.remove()
    summed = head_vector(tiny, means, [(1, head) for head in range(means.shape[1])])
    torch.testing.assert_close(summed, recorded["out"], rtol=1e-5, atol=1e-6)
    one_head = head_vector(tiny, means, [(1, 0)])
    assert not torch.allclose(one_head, summed)


def test_batched_indirect_effects_equal_single_head_interventions_on_whole_prompts(model):
    context, dev = _data()
    shuffled = context.flip(0)
    means = mean_head_outputs(model, context, dev.queries)
    effects = indirect_effects(model, means, shuffled, dev, layers=[0, 2])
    assert effects[1].isnan().all() and not effects[[0, 2]].isnan().any()
    prompts = [torch.cat([shuffled, q]) for q in dev.queries]

    def answer_probability(layer=None, head=None):
        probabilities = []
        for prompt, answer in zip(prompts, dev.answers, strict=True):
            handle = None
            if layer is not None:

                def hook(module, args):
                    inputs = args[0].clone()
                    inputs[:, -1, head * 6 : (head + 1) * 6] = means[layer, head]
                    return (inputs,)

                handle = model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(hook)
            with torch.no_grad():
                logits = run_model(model, ForwardInputs.plain(prompt[None]))[0, -1]
            if handle is not None:
                handle.remove()
            probabilities.append(logits.softmax(-1)[answer])
        return torch.stack(probabilities)

    baseline = answer_probability()
    for layer, head in [(0, 0), (0, 5), (2, 3)]:
        expected = (answer_probability(layer, head) - baseline).mean()
        assert effects[layer, head] == pytest.approx(float(expected), abs=1e-5)
    vector = function_vector(model, means, effects, dev, head_counts=(1, 3), layers=[0, 1, 2])
    assert len(vector.heads) in (1, 3) and all(layer in (0, 2) for layer, _ in vector.heads)
    assert vector.dev_scores[(len(vector.heads), vector.layer)].key == max(s.key for s in vector.dev_scores.values())
    assert torch.allclose(vector.vector, head_vector(model, means, vector.heads))


def test_bad_input_is_refused_in_one_line(model):
    context, dev = _data()
    states = last_token_states(model, context, dev.queries[:1])
    means = mean_head_outputs(model, context, dev.queries[:1])
    cases = [
        (lambda: mean_head_outputs(tiny_model("gpt2"), context, dev.queries), "need each head's output"),
        (lambda: task_vector(model, states[:, 0], dev, layers=[7]), "task-vector layers must lie in"),
        (lambda: last_token_states(model, context, []), "no dummy query given"),
        (lambda: function_vector(model, means, torch.full((3, 6), float("nan")), dev), "no head's indirect effect"),
    ]
    for call, message in cases:
        with pytest.raises(ImplicitICLError, match=message) as error:
            call()
        assert "\n" not in str(error.value)
