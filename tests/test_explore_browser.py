"""The explorer's page in a real headless Chromium (Debian's chromium + chromedriver, driven by selenium), served by
a real uvicorn server on the default model: a typed 2-shot prompt renders 30 layers of heat map cells, a click on
a cell shows that prefix's top-k, and the page's numbers are the library's for the same prompt; the compile tab
opened from a link, then with a typed query, shows the answers that the API gives for the same request.

Set IMPLICIT_ICL_WRITE_FIGURES=1 to also write the screenshot to docs/figures/explorer.png (the README's figure).
"""

import json
import os
import shutil
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch

from implicit_icl.analyses.dynamics.prefixes import prefix_patches
from implicit_icl.analyses.dynamics.series import answer_scores
from implicit_icl.explore.server import BackgroundServer
from implicit_icl.tasks.encoding import split_ids, token_ids

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[dev])")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CONTEXT, QUERY, TARGET = "Q: hot\nA: cold\n\nQ: big\nA: small\n\n", "Q: up\nA:", " down"
FIGURE = Path(__file__).resolve().parents[1] / "docs" / "figures" / "explorer.png"
LAYER, PREFIX = 12, 9  # the clicked cell: the first 9 context tokens, i.e. the first demonstration


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("Chromium is not installed and could not be (apt-get install -y chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1400,1250")
    chrome = webdriver.Chrome(service=webdriver.ChromeService(driver), options=options)
    chrome.set_page_load_timeout(30)
    yield chrome
    chrome.quit()


@pytest.fixture(scope="module")
def library(default_model):
    """The library's own numbers for the prompt: every prefix's trajectory and the target token."""
    context, query = split_ids(default_model.tokenizer, CONTEXT, QUERY)
    trajectory = prefix_patches(default_model.model, context, query, dtype=torch.float64)
    return trajectory, token_ids(default_model.tokenizer, TARGET)[0]


def wait(browser, condition, seconds=60):
    return WebDriverWait(browser, seconds).until(lambda _: condition())


def idle_with_cells(browser):
    busy = browser.find_element(By.ID, "busy").get_attribute("data-busy") == "true"
    return not busy and browser.find_elements(By.CSS_SELECTOR, "#heatmap rect.cell")


def listed(browser, list_id):
    """(token ids, probabilities) of one top-k list as the page holds them."""
    items = browser.find_elements(By.CSS_SELECTOR, f"#{list_id} li")
    return [int(i.get_attribute("data-token")) for i in items], [
        float(i.get_attribute("data-probability")) for i in items
    ]


def assert_panel_is_the_library(browser, trajectory, target, j):
    expected = {"topk-patched": trajectory.patched_logits[j], "topk-context": trajectory.context_logits[j]}
    expected["topk-alone"] = trajectory.context_logits[0]  # prefix 0: the query alone
    for list_id, logits in expected.items():
        tokens, probabilities = listed(browser, list_id)
        top = logits.double().softmax(-1).topk(5)
        assert tokens == top.indices.tolist(), list_id
        assert probabilities == pytest.approx(top.values.tolist(), rel=1e-9), list_id
    probability, rank = answer_scores(trajectory.patched_logits, target)
    shown = browser.find_element(By.ID, "answer-probability").get_attribute("data-probability")
    assert float(shown) == pytest.approx(float(probability[j]), rel=1e-9)
    assert browser.find_element(By.ID, "answer-rank").text == str(int(rank[j]))


def type_into(browser, element_id, text):
    field = browser.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(text)


def test_the_page_shows_every_prefix_and_its_top_k_as_the_library_does(browser, default_model, library, tmp_path):
    trajectory, target = library
    prefixes = len(trajectory.prefix_lengths)
    with BackgroundServer(default_model) as url:
        browser.get(url)
        wait(browser, lambda: "30 layers" in browser.find_element(By.ID, "model").text)
        type_into(browser, "context", CONTEXT)
        type_into(browser, "query", QUERY)
        type_into(browser, "target", TARGET)
        browser.find_element(By.ID, "run").click()
        cells = wait(browser, lambda: idle_with_cells(browser))
        assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
        layers = {int(cell.get_attribute("data-layer")) for cell in cells}
        assert layers == set(range(30)) and len(cells) == 30 * prefixes
        assert {int(cell.get_attribute("data-prefix")) for cell in cells} == set(range(prefixes))
        detail = browser.find_element(By.ID, "detail")
        assert detail.get_attribute("data-prefix") == str(prefixes - 1)  # the whole context first
        assert_panel_is_the_library(browser, trajectory, target, prefixes - 1)
        before = listed(browser, "topk-patched")

        browser.find_element(By.CSS_SELECTOR, f'#heatmap rect[data-layer="{LAYER}"][data-prefix="{PREFIX}"]').click()
        wait(browser, lambda: detail.get_attribute("data-prefix") == str(PREFIX), 10)
        assert listed(browser, "topk-patched") != before
        assert_panel_is_the_library(browser, trajectory, target, PREFIX)
        assert f"prefix={PREFIX}" in browser.current_url and f"layer={LAYER}" in browser.current_url
        assert browser.save_screenshot(str(tmp_path / "explorer.png"))
        if os.environ.get("IMPLICIT_ICL_WRITE_FIGURES"):
            FIGURE.parent.mkdir(parents=True, exist_ok=True)
            assert browser.save_screenshot(str(FIGURE))

        # the shared link runs the prompt at once and opens on the same cell
        query = dict(context=CONTEXT, query=QUERY, target=TARGET, prefix=PREFIX, layer=LAYER)
        browser.get(f"{url}?{urllib.parse.urlencode(query)}")
        wait(browser, lambda: idle_with_cells(browser))
        wait(browser, lambda: browser.find_element(By.ID, "detail").get_attribute("data-prefix") == str(PREFIX), 10)
        assert_panel_is_the_library(browser, trajectory, target, PREFIX)
        selected = browser.find_elements(By.CSS_SELECTOR, "#heatmap rect.cell.selected")
        assert [(c.get_attribute("data-layer"), c.get_attribute("data-prefix")) for c in selected] == [
            (str(LAYER), str(PREFIX))
        ]


DEMONSTRATIONS = "Q: hot\nA: cold\n\nQ: big\nA: small\n\nQ: fast\nA: slow\n\n"
CALIBRATION, QUERIES = ["Q: wet", "Q: tall", "Q: old", "Q: happy"], ["Q: up", "Q: light"]


def api_compile(url: str, queries: list[str]) -> dict:
    """POST /api/compile with what the page sends for the form (each line + "\nA:")."""
    body = dict(demonstrations=DEMONSTRATIONS, calibration=[f"{q}\nA:" for q in CALIBRATION])
    body["queries"] = [f"{q}\nA:" for q in queries]
    request = urllib.request.Request(
        urllib.parse.urljoin(url, "api/compile"), json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def compiled_rows(browser, count: int):
    """The compile table's rows once the page is idle and holds `count` of them."""
    if browser.find_element(By.ID, "busy").get_attribute("data-busy") == "true":
        return None
    rows = browser.find_elements(By.CSS_SELECTOR, "#compile-results tbody tr")
    return rows if len(rows) == count else None


def assert_rows_are_the_api(rows, expected: dict):
    for row, answer in zip(rows, expected["queries"], strict=True):
        shown = [int(td.get_attribute("data-token")) for td in row.find_elements(By.CSS_SELECTOR, "td[data-token]")]
        assert shown == [answer[column][0]["token"] for column in ("compiled", "icl", "zero_shot")]


def test_the_compile_tab_answers_as_the_api_does(browser, default_model):
    with BackgroundServer(default_model) as url:
        link = dict(
            tab="compile", demonstrations=DEMONSTRATIONS, calibration="\n".join(CALIBRATION), queries="\n".join(QUERIES)
        )
        browser.get(f"{url}?{urllib.parse.urlencode(link)}")  # the link compiles at once
        rows = wait(browser, lambda: compiled_rows(browser, len(QUERIES)), 120)
        assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
        assert_rows_are_the_api(rows, api_compile(url, QUERIES))

        typed = [*QUERIES, "Q: early"]
        type_into(browser, "queries", "\n".join(typed))
        browser.find_element(By.ID, "run-compile").click()
        rows = wait(browser, lambda: compiled_rows(browser, len(typed)), 120)
        assert_rows_are_the_api(rows, api_compile(url, typed))
