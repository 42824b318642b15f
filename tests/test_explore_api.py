"""The explorer's JSON API: each endpoint's numbers are the library's own for the same input, bad requests are
one-line 4xx errors, one computation runs at a time, and the server listens on 127.0.0.1 unless told otherwise."""

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from implicit_icl.analyses.compile import compile_patch
from implicit_icl.analyses.dynamics.prefixes import prefix_patches
from implicit_icl.analyses.dynamics.series import answer_scores, layer_series
from implicit_icl.cli.app import app as cli_app
from implicit_icl.engine.construct import compute_patch
from implicit_icl.engine.queries import context_logits, reduced_logits
from implicit_icl.engine.verify import verify_patch
from implicit_icl.explore import api
from implicit_icl.explore.server import BackgroundServer, create_app
from implicit_icl.models.load import LoadedModel
from implicit_icl.models.zoo import tiny_model
from implicit_icl.tasks.encoding import split_ids

CONTEXT, QUERY = [5, 17, 3, 42, 8, 61, 29], [11, 4]
PROMPT = dict(context_ids=CONTEXT, query_ids=QUERY)


@pytest.fixture(scope="module")
def loaded():
    return LoadedModel(tiny_model("llama", dtype=torch.float64), None, "tiny-llama")


@pytest.fixture(scope="module")
def client(loaded):
    return TestClient(create_app(loaded))


def f64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def probabilities(items):
    return torch.tensor([item["probability"] for item in items], dtype=torch.float64)


def assert_top_k(items, logits, k=5):
    """The top-k entries are the k most probable tokens of logits [V], with their float64 softmax."""
    expected = logits.double().softmax(-1).topk(k)
    assert [item["token"] for item in items] == expected.indices.tolist()
    torch.testing.assert_close(probabilities(items), expected.values, rtol=1e-12, atol=0)


def test_dynamics_equals_prefix_patches_and_layer_series(client, loaded):
    response = client.post("/api/dynamics", json=dict(PROMPT, target_id=3))
    assert response.status_code == 200
    result = response.json()
    trajectory = prefix_patches(loaded.model, CONTEXT, QUERY, dtype=torch.float64)
    series = layer_series(loaded.model, trajectory)
    assert result["prefix_lengths"] == list(range(len(CONTEXT) + 1))
    for name in ("update_norms", "increment_norms", "output_norms"):
        torch.testing.assert_close(f64(result["layers"][name]), getattr(series, name), rtol=1e-12, atol=0)
    alignment = f64([[torch.nan if v is None else v for v in row] for row in result["layers"]["alignment"]])
    torch.testing.assert_close(alignment, series.alignment, rtol=1e-12, atol=0, equal_nan=True)
    probability, rank = answer_scores(trajectory.patched_logits, 3)
    torch.testing.assert_close(f64(result["answer"]["probability"]), probability, rtol=1e-12, atol=0)
    assert result["answer"]["rank"] == rank.tolist() and result["answer"]["given"]
    for j in range(len(result["prefix_lengths"])):
        assert_top_k(result["top_k"]["patched"][j], trajectory.patched_logits[j])
        assert_top_k(result["top_k"]["context"][j], trajectory.context_logits[j])
        # the patch is exact (float64): the patched query alone ranks as the model with the prefix does
        context = probabilities(result["top_k"]["context"][j])
        torch.testing.assert_close(probabilities(result["top_k"]["patched"][j]), context, rtol=1e-9, atol=0)
    alone = loaded.model(torch.tensor([QUERY])).logits[0, -1]
    assert_top_k(result["top_k"]["query_alone"], alone)
    assert result["max_abs_logit_diff"] < 1e-10


def test_dynamics_follows_the_top1_token_without_a_target(client, loaded):
    result = client.post("/api/dynamics", json=PROMPT).json()
    with_context = loaded.model(torch.tensor([CONTEXT + QUERY])).logits[0, -1]
    assert result["answer"]["token"] == int(with_context.argmax()) and not result["answer"]["given"]
    assert result["answer"]["rank"][-1] == 1


def test_patch_equals_compute_patch_and_verify_patch(client, loaded):
    result = client.post("/api/patch", json=dict(PROMPT, top_k=7)).json()
    model = loaded.model
    patch = compute_patch(model, CONTEXT, QUERY, dtype=torch.float64)
    assert result["verification"] == verify_patch(model, CONTEXT, QUERY, patch).as_dict()  # the same computation
    assert result["verification"]["max_abs_logit_diff"] < 1e-10 < result["verification"]["baseline_max_abs_logit_diff"]
    summary = patch.summary()
    for row in result["layers"]:
        mine = [r["norm"] for r in summary if r["layer"] == row["layer"]]
        assert [p["norm"] for p in row["parameters"]] == pytest.approx(mine, rel=1e-12)
        assert row["norm"] == pytest.approx(sum(n**2 for n in mine) ** 0.5, rel=1e-12)
    assert [row["layer"] for row in result["layers"]] == list(range(model.config.num_hidden_layers))
    n, q = len(CONTEXT), len(QUERY)
    assert_top_k(result["top_k"]["context"], model(torch.tensor([CONTEXT + QUERY])).logits[0, -1], k=7)
    assert_top_k(result["top_k"]["query_alone"], model(torch.tensor([QUERY])).logits[0, -1], k=7)
    with patch.applied(model):
        patched = model(torch.tensor([QUERY]), position_ids=n + torch.arange(q)[None]).logits[0, -1]
    assert_top_k(result["top_k"]["patched"], patched, k=7)


def test_compile_equals_compile_patch_with_icl_and_zero_shot(client, loaded):
    calibration, queries = [[7, 8], [9, 10, 2], [12], [13, 14]], [[15, 16], [20]]
    body = dict(context_ids=CONTEXT, calibration=calibration, queries=queries, ridge=0.5)
    result = client.post("/api/compile", json=body).json()
    model, ids = loaded.model, [torch.tensor(query) for query in queries]
    patch = compile_patch(model, CONTEXT, calibration, ridge=0.5)
    with patch.applied(model):
        compiled = reduced_logits(model, ids, len(CONTEXT))
    icl = context_logits(model, torch.tensor(CONTEXT), ids)
    zero_shot = reduced_logits(model, ids, len(CONTEXT))
    for row, mine, theirs, plain in zip(result["queries"], compiled, icl, zero_shot, strict=True):
        assert [item["token"] for item in row["compiled"]] == mine.double().topk(5).indices.tolist()
        torch.testing.assert_close(probabilities(row["compiled"]), mine.double().softmax(-1).topk(5).values)
        assert_top_k(row["icl"], theirs)
        assert_top_k(row["zero_shot"], plain)
    assert result["calibration_queries"] == 4 and result["settings"]["ridge"] == 0.5


def test_one_calibration_token_at_ridge_zero_compiles_the_exact_patch(client):
    """docs/theory.md §7: one calibration query, ridge 0, full rank is the exact patch, so it gives ICL's answer."""
    body = dict(context_ids=CONTEXT, calibration=[[33]], queries=[[33]], ridge=0)
    (row,) = client.post("/api/compile", json=body).json()["queries"]
    assert [item["token"] for item in row["compiled"]] == [item["token"] for item in row["icl"]]
    torch.testing.assert_close(probabilities(row["compiled"]), probabilities(row["icl"]), rtol=1e-4, atol=0)
    assert [item["token"] for item in row["zero_shot"]] != [item["token"] for item in row["icl"]]


def test_new_queries_on_the_same_context_reuse_the_compiled_patch(loaded, monkeypatch):
    fits = []
    original = api.compile_patch
    monkeypatch.setattr(api, "compile_patch", lambda *args, **kwargs: fits.append(1) or original(*args, **kwargs))
    client = TestClient(create_app(loaded))
    body = dict(context_ids=CONTEXT, calibration=[[7, 8], [9]])
    first = client.post("/api/compile", json=dict(body, queries=[[15]])).json()
    again = client.post("/api/compile", json=dict(body, queries=[[16], [15]])).json()
    assert len(fits) == 1 and again["queries"][1]["compiled"] == first["queries"][0]["compiled"]
    client.post("/api/compile", json=dict(body, queries=[[15]], ridge=2.0))
    assert len(fits) == 2


MALFORMED = [
    ("dynamics", "not an object"),
    ("dynamics", [1, 2]),
    ("dynamics", dict(context_ids=[], query_ids=[1])),
    ("dynamics", dict(context_ids="1 2", query_ids=[1])),
    ("dynamics", dict(context_ids=[1.5, 2], query_ids=[1])),
    ("dynamics", dict(context_ids=[1, 2], query_ids=[True])),
    ("dynamics", dict(context_ids=[1, 2], query_ids=[1000])),
    ("dynamics", dict(context_ids=[1] * 401, query_ids=[1])),
    ("dynamics", dict(context_ids=[1, 2], query_ids=[3], target_id=-1)),
    ("dynamics", dict(context_ids=[1, 2], query_ids=[3], colour="red")),
    ("dynamics", dict(context="text", query="text")),  # the tiny model has no tokenizer
    ("dynamics", dict(context_ids=[1, 2])),
    ("patch", dict(context_ids=[1, 2], query_ids=[3], top_k=0)),
    ("patch", dict(context_ids=[1, 2], query_ids=[3], top_k="5")),
    ("compile", dict(task="no such task")),
    ("compile", dict(context_ids=[1, 2], queries=[[3]])),
    ("compile", dict(context_ids=[1, 2], calibration=[], queries=[[3]])),
    ("compile", dict(context_ids=[1, 2], calibration=[[3]], queries=[[4]] * 17)),
    ("compile", dict(context_ids=[1, 2], calibration=[[3]], queries=[[4]], ridge=-1)),
    ("compile", dict(task="antonym", context_ids=[1, 2])),
]


@pytest.mark.parametrize("endpoint, body", MALFORMED, ids=lambda value: str(value)[:40])
def test_malformed_requests_get_a_one_line_4xx(client, endpoint, body):
    response = client.post(f"/api/{endpoint}", json=body)
    assert 400 <= response.status_code < 500
    message = response.json()["error"]
    assert message and "\n" not in message and len(message) < 400


def test_a_body_that_is_not_json_gets_a_one_line_4xx(client):
    response = client.post("/api/patch", content=b"{context", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "\n" not in response.json()["error"]


def test_one_computation_at_a_time(loaded):
    app = create_app(loaded)
    client = TestClient(app)
    explorer = app.state.explorer
    assert client.get("/api/status").json()["busy"] is False
    with explorer._lock:
        explorer._status.update(busy=True, endpoint="dynamics")
        response = client.post("/api/patch", json=PROMPT)
        assert response.status_code == 409 and "busy" in response.json()["error"]
        explorer._status.update(busy=False, endpoint=None)
    assert client.post("/api/patch", json=PROMPT).status_code == 200
    assert client.get("/api/status").json() == dict(busy=False, endpoint=None, stage=None, step=0, seconds=None)


def test_the_page_and_its_script_are_served_without_network(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="heatmap"' in page.text and "/static/explore.js" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere
    script = client.get("/static/explore.js")
    assert script.status_code == 200 and "data-layer" in script.text
    assert client.get("/api/info").json()["n_layers"] == loaded_layers(client)


def loaded_layers(client) -> int:
    return client.app.state.explorer.loaded.model.config.num_hidden_layers


def test_a_real_server_listens_on_127_0_0_1_by_default(loaded):
    background = BackgroundServer(loaded)
    assert background.sock.getsockname()[0] == "127.0.0.1"
    with background as url:
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + "api/info", timeout=10) as response:
            assert json.load(response)["model"] == "tiny-llama"


def test_the_command_serves_on_127_0_0_1_unless_told(loaded, monkeypatch):
    served = []
    monkeypatch.setattr("implicit_icl.models.load.load_model", lambda name, dtype: loaded)
    monkeypatch.setattr(
        "implicit_icl.explore.server.serve", lambda model, host, port, open_browser: served.append((host, open_browser))
    )
    assert CliRunner().invoke(cli_app, ["explore", "--no-browser", "--port", "0"]).exit_code == 0
    assert CliRunner().invoke(cli_app, ["explore", "--host", "0.0.0.0", "--port", "0"]).exit_code == 0
    assert served == [("127.0.0.1", False), ("0.0.0.0", True)]
    bad = CliRunner().invoke(cli_app, ["explore", "--dtype", "float8", "--no-browser"])
    assert bad.exit_code == 2 and "float8" in bad.output


def test_the_command_prints_its_url_serves_and_stops_on_ctrl_c(tmp_path):
    """The real `implicit-icl explore` on a saved tiny model: its printed URL answers; SIGINT stops it, exit 0."""
    tiny_model("llama", dtype=torch.float32).save_pretrained(tmp_path)
    command = [str(Path(sys.executable).with_name("implicit-icl")), "explore", "--model", str(tmp_path), "--port", "0"]
    server = subprocess.Popen([*command, "--no-browser"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        url = line.split(" at ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:"), line
        with urllib.request.urlopen(url + "api/info", timeout=10) as response:
            assert json.load(response)["n_layers"] == 2
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
        assert server.stdout.read().strip() == "implicit-icl explore: stopped"
    finally:
        server.kill()


def test_default_model_patch_endpoint_on_one_text_prompt(default_model):
    """The default model (30 layers) on one 2-shot prompt: the endpoint's patch is the library's, and exact."""
    context, query = "Q: hot\nA: cold\n\nQ: big\nA: small\n\n", "Q: up\nA:"
    result = TestClient(create_app(default_model)).post("/api/patch", json=dict(context=context, query=query)).json()
    context_ids, query_ids = split_ids(default_model.tokenizer, context, query)
    assert [t["token"] for t in result["context_tokens"]] == context_ids
    patch = compute_patch(default_model.model, context_ids, query_ids, dtype=torch.float64)
    expected = verify_patch(default_model.model, context_ids, query_ids, patch)
    assert result["verification"]["max_abs_logit_diff"] == pytest.approx(expected.max_abs_logit_diff, abs=1e-5)
    assert result["verification"]["max_abs_logit_diff"] <= 1e-3 and result["verification"]["top1_match"]
    assert [t["token"] for t in result["top_k"]["patched"]] == [t["token"] for t in result["top_k"]["context"]]
