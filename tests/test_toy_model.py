"""The toy transformer and its implicit updates: exactness against the model's own forward pass."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from implicit_icl import ImplicitICLError
from implicit_icl.toy import experiments
from implicit_icl.toy.data import sample_prompts
from implicit_icl.toy.finetune import choose_step_size, finetune
from implicit_icl.toy.model import ToyConfig, build_model
from implicit_icl.toy.train import training_batch

F64 = torch.float64
SMALL = dict(dim=3, context_length=7, attention_width=8, mlp_width=16, n_heads=2)


def prompts_for(config: ToyConfig, n: int = 16, seed: int = 0, dtype=F64):
    return sample_prompts(n, config.dim, config.context_length, 0.1, torch.Generator().manual_seed(seed), dtype)


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 1000),
    n_blocks=st.integers(1, 3),
    skip=st.booleans(),
    pre_norm=st.booleans(),
    n_heads=st.sampled_from([1, 2, 4]),
)
def test_query_alone_through_patched_blocks_reproduces_the_prompt(seed, n_blocks, skip, pre_norm, n_heads):
    config = ToyConfig(**SMALL | dict(n_heads=n_heads), n_blocks=n_blocks, mlp_skip=skip, pre_norm=pre_norm)
    model = build_model(config, seed).to(F64)
    prompts = prompts_for(config, seed=seed)
    with torch.no_grad():
        with_prompt = model.predict(prompts.tokens())
        updates = model.implicit_updates(prompts.tokens())
        patched = model.predict_patched(prompts.query_token(), updates)
        unpatched = model.predict(prompts.query_token()[:, None])
    torch.testing.assert_close(patched, with_prompt, rtol=1e-10, atol=1e-12)
    assert (unpatched - with_prompt).abs().max() > 1e-6  # the patch carries the context
    # Block by block, so that errors cannot compensate: the lone query's state equals its context-ful one.
    hidden, alone = prompts.tokens(), prompts.query_token()[:, None]
    with torch.no_grad():
        for block, update in zip(model.blocks, updates, strict=True):
            hidden, alone = block(hidden), block(alone, update)
            torch.testing.assert_close(alone[:, 0], hidden[:, -1], rtol=1e-10, atol=1e-12)
    assert all((update.bias_shift is not None) == skip for update in updates)


def test_float32_agreement_is_at_float_precision():
    config = ToyConfig(**SMALL)
    model = build_model(config, 3)
    prompts = prompts_for(config, n=64, dtype=torch.float32)
    result = experiments.patch_agreement(model, prompts)
    assert result["max_rel_diff"] < 1e-5
    assert result["loss_patched"] == pytest.approx(result["loss_with_prompt"], rel=1e-5)


def test_evaluation_in_chunks_matches_one_pass_over_every_prompt():
    config = ToyConfig(**SMALL)
    model = build_model(config, 2).to(F64)
    prompts = prompts_for(config, n=experiments.PROMPTS_PER_PASS * 2 + 5)  # two full chunks and a partial one
    by_k = experiments.predictions_by_k(model, prompts)
    one_pass = torch.stack([model.predict(prompts.tokens(k)) for k in range(config.context_length + 1)], dim=1)
    torch.testing.assert_close(by_k, one_pass, rtol=1e-12, atol=1e-12)
    at_n = experiments.full_context_errors(model, prompts, noise=0.1)
    torch.testing.assert_close(at_n["model"], (one_pass[:, -1] - prompts.query_label).pow(2) / config.dim)
    agreement = experiments.patch_agreement(model, prompts)
    assert agreement["loss_with_prompt"] == pytest.approx((one_pass[:, -1] - prompts.query_label).pow(2).mean().item())


def test_updates_are_rank_one():
    config = ToyConfig(**SMALL, n_blocks=2, mlp_skip=True)
    model = build_model(config, 1).to(F64)
    assert experiments.rank_one_sigma_ratio(model, prompts_for(config)) < 1e-12


def test_the_query_never_sees_later_tokens():
    """The training batch puts the query at position k and leaves examples after it: causality hides them."""
    config = ToyConfig(**SMALL)
    model = build_model(config, 0).to(F64)
    prompts = prompts_for(config)
    tokens, positions = training_batch(prompts, torch.Generator().manual_seed(0), full_context_share=0.5)
    scrambled = tokens.clone()
    for b, k in enumerate(positions.tolist()):
        scrambled[b, k + 1 :] = torch.randn_like(scrambled[b, k + 1 :])
        torch.testing.assert_close(tokens[b, k], prompts.query_token()[b])
        torch.testing.assert_close(tokens[b, :k], prompts.example_tokens()[b, :k])
    rows = torch.arange(prompts.size)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[rows, positions], model(scrambled)[rows, positions])
        torch.testing.assert_close(
            model(tokens)[rows, positions],
            torch.stack(
                [model.predict(prompts.subset(slice(b, b + 1)).tokens(k))[0] for b, k in enumerate(positions.tolist())]
            ),
        )


@pytest.mark.parametrize("skip", [False, True])
def test_prefix_updates_reproduce_the_model_after_i_examples(skip):
    config = ToyConfig(**SMALL, mlp_skip=skip, pre_norm=skip)
    model = build_model(config, 2).to(F64)
    prompts = prompts_for(config)
    block = model.first_block()
    update = experiments.prefix_update(block, prompts)
    patched = experiments.patched_prefix_predictions(block, prompts, update)
    torch.testing.assert_close(patched, experiments.predictions_by_k(model, prompts)[:, 1:], rtol=1e-10, atol=1e-12)


def test_gradient_descent_identity_holds_on_the_model():
    config = ToyConfig(**SMALL)
    model = build_model(config, 4).to(F64)
    assert experiments.gd_identity_error(model.first_block(), prompts_for(config, n=3)) < 1e-12


def test_batched_increment_norms_match_one_prompt_at_a_time():
    from implicit_icl.theory import increment_norms, prefix_updates

    config = ToyConfig(**SMALL)
    block = build_model(config, 5).to(F64).first_block()
    prompts = prompts_for(config, n=4)
    with_prefix, alone = experiments.prefix_states(block, prompts)
    batched = experiments.increment_norms_by_token(block, prompts)
    weight = block.first_layer.weight.detach()
    for b in range(prompts.size):
        single = increment_norms(prefix_updates(weight, with_prefix.mlp_input[b], alone.mlp_input[b]))
        torch.testing.assert_close(batched[b], single)


def test_one_sgd_step_matches_autograd_on_the_real_parameter():
    """Second method: fine-tune a copy of the model's own first MLP matrix for one prompt."""
    config = ToyConfig(**SMALL, mlp_skip=True, pre_norm=True)
    model = build_model(config, 6).to(F64)
    prompts = prompts_for(config, n=3)
    step_size = 0.05
    run = finetune(model.first_block(), prompts, step_size)
    for b in range(prompts.size):
        copy = build_model(config, 6).to(F64)
        optimizer = torch.optim.SGD([copy.blocks[0].first_layer.weight], lr=step_size)
        single = prompts.subset(slice(b, b + 1))
        for j in range(config.context_length):
            token = torch.cat([single.inputs[:, j], torch.zeros(1, 1, dtype=F64)], -1)
            optimizer.zero_grad()
            (copy.predict(token[:, None]) - single.labels[:, j]).pow(2).sum().backward()
            optimizer.step()
        with torch.no_grad():
            final = copy.predict(single.query_token()[:, None])
        torch.testing.assert_close(run.test_loss[b, -1], (final - single.query_label).pow(2)[0])


def test_alignment_is_one_for_the_update_itself_and_step_size_rule_picks_the_grid_minimum():
    config = ToyConfig(**SMALL)
    block = build_model(config, 7).to(F64).first_block()
    prompts = prompts_for(config, n=8)
    update = experiments.prefix_update(block, prompts)
    run = finetune(block, prompts, 0.01, update.weight)
    assert run.alignment.abs().max() <= 1 + 1e-12
    from implicit_icl.toy.finetune import _cosine

    torch.testing.assert_close(_cosine(update.weight[:, 2], update.weight[:, 2].dense()), torch.ones(8, dtype=F64))
    best, scores = choose_step_size(block, prompts, [1e-3, 1e-2, 1e3])
    assert scores[-1] == float("inf") or scores[-1] > min(scores[:2])
    assert best == [1e-3, 1e-2, 1e3][scores.index(min(scores))]


def test_bad_configurations_and_requests_are_refused():
    with pytest.raises(ImplicitICLError, match="multiple of n_heads"):
        ToyConfig(attention_width=10, n_heads=4)
    with pytest.raises(ImplicitICLError, match="must be ≥ 1"):
        ToyConfig(dim=0)
    with pytest.raises(ImplicitICLError, match="one-block model"):
        build_model(ToyConfig(**SMALL, n_blocks=2), 0).first_block()
    config = ToyConfig(**SMALL)
    with pytest.raises(ImplicitICLError, match="use 0..N"):
        prompts_for(config).tokens(config.context_length + 1)
    with pytest.raises(ImplicitICLError, match="noise"):
        sample_prompts(2, 2, 2, noise=-1.0)
    with pytest.raises(ImplicitICLError, match="grid is empty"):
        choose_step_size(build_model(config, 0).first_block(), prompts_for(config), [])
    with pytest.raises(ImplicitICLError, match="T ≥ 2"):
        build_model(config, 0).implicit_updates(torch.zeros(2, 1, config.dim + 1))


def test_experiments_leave_the_model_weights_untouched_even_on_errors():
    config = ToyConfig(**SMALL)
    model = build_model(config, 8).to(F64)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    prompts = prompts_for(config, n=4)
    update = experiments.prefix_update(model.first_block(), prompts)
    finetune(model.first_block(), prompts, 0.1, update.weight)
    choose_step_size(model.first_block(), prompts, [0.1, 1.0])
    with pytest.raises(ImplicitICLError, match="one per prompt"):
        finetune(model.first_block(), prompts, torch.ones(3, dtype=F64))
    assert not model.first_block().first_layer._forward_hooks  # no hook left behind
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in before.items())
