"""The explorer's page in a real browser (headless chromium through Playwright): type a prompt and trace it,
open a layer's sub-updates and a value's page, switch the value off and see the prediction change, search a
token, follow the permalink, and read a bad request's error bar.

The model is a tiny random GPT-2 with one planted memory: value 3 of layer 1 writes ``PLANT * u`` into the
stream, where ``u`` is the (unit) output embedding of `` Paris`` and its key fires on every token, so the
unedited model predicts `` Paris`` and switching that value off takes it away. The page's numbers are compared
with the :class:`Explorer` API (itself tested against ``fflayers.hooks``) and with the planted answer."""

from __future__ import annotations

import pytest
import torch

from fflayers.embedding_space.value_index import ValueIndex
from fflayers.explore import Explorer, Notes, serve_in_thread
from fflayers.memories.index import MemoryIndex
from fflayers.memories.textual import format_line

PROMPT = "The capital of France is the city of"
LAYER, DIM, PLANT = 1, 3, 100.0
OFF = {"kind": "value", "layer": LAYER, "dim": DIM, "op": "off"}


@pytest.fixture(scope="module")
def explorer(tiny_gpt2_dir, tmp_path_factory):
    from fflayers.backends.hf import load_hf_lm

    adapter = load_hf_lm(str(tiny_gpt2_dir), device="cpu")
    paris = adapter.vocab.tokenize(" Paris")
    assert len(paris) == 1
    gpt2 = adapter.model.transformer
    with torch.no_grad():
        u = torch.randn(gpt2.wte.weight.shape[1], generator=torch.Generator().manual_seed(1))
        u /= u.norm()
        gpt2.wte.weight[paris[0]] = u                      # tied: the input and the output embedding
        mlp = gpt2.h[LAYER].mlp
        mlp.c_fc.bias[DIM] = 5.0                           # the key fires on every token (gelu(5) ~ 5)
        mlp.c_proj.weight[DIM] = PLANT * u                 # the value writes " Paris"
    base = tmp_path_factory.mktemp("browser")
    textual = base / "textual"
    textual.mkdir()
    (textual / f"{DIM}_{LAYER}.txt").write_text(format_line(4.5, "the capital of France is", "Paris") + "\n")
    return Explorer(adapter, name="tiny-gpt2-planted", memories=MemoryIndex(textual),
                    values=ValueIndex(adapter), notes=Notes(base / "notes.sqlite"))


@pytest.fixture(scope="module")
def base_url(explorer):
    with serve_in_thread(explorer) as url:
        yield url


def wait_traces(page, n: int) -> None:
    """Waits until the page has rendered its ``n``-th trace and no request is in flight."""
    page.wait_for_function(
        "n => Number(document.body.dataset.traces || 0) >= n && document.body.dataset.state === 'traced'",
        arg=n)


def chip_ids(page, line: str) -> list[int]:
    return [int(x) for x in page.locator(f"#prediction {line} .pred").evaluate_all(
        "els => els.map(e => e.dataset.tokenId)")]


def test_trace_value_switch_off_search_and_permalink(page, base_url, explorer):
    paris = explorer.token_id(" Paris")
    page.goto(base_url)
    page.wait_for_function("() => document.getElementById('model-name').textContent === 'tiny-gpt2-planted'")
    page.fill("#prompt", PROMPT)
    page.click("#trace-btn")
    wait_traces(page, 1)

    # the trace: the prediction and the per-layer table are the API's, and the planted value wins
    api = explorer.trace(PROMPT, k=10)
    assert chip_ids(page, ".pred-line") == [t["id"] for t in api["original"]["prediction"]]
    assert chip_ids(page, ".pred-line")[0] == paris
    assert page.locator("#trace-table tbody tr").count() == explorer.adapter.n_layers
    assert page.locator("#tokens .token-chip").count() == len(api["tokens"])

    # the sub-updates of the last layer: the planted value ranks first by |m| ||v||
    page.click(f"#trace-table tr[data-layer='{LAYER}'] td.cell-mlp")
    first = page.locator("#subupdates .sub-list[data-rank='score'] tbody tr").first
    first.wait_for()
    assert int(first.get_attribute("data-dim")) == DIM
    expected = [v["dim"] for v in explorer.subupdates(PROMPT, layer=LAYER)["by_magnitude"]]
    shown = page.locator("#subupdates .sub-list[data-rank='score'] tbody tr").evaluate_all(
        "rows => rows.map(r => Number(r.dataset.dim))")
    assert shown == expected

    # the value page: its top token is " Paris" and its trigger example is the planted one
    first.locator("a.value-link").click()
    value = page.locator("#value-page")
    value.locator("h3").wait_for()
    assert f"L{LAYER}·{DIM}" in value.locator("h3").inner_text()
    assert value.locator(".scored").nth(2).locator("li .t").first.inner_text() == "␣Paris"
    assert "the capital of France is" in value.locator(".triggers").inner_text()

    # switch it off (every position): the edited prediction is the API's under the same edit, Paris is gone
    value.locator(".off-btn").click()
    wait_traces(page, 2)
    edited = explorer.trace(PROMPT, k=10, interventions=[OFF])
    assert chip_ids(page, ".pred-line.edited") == [t["id"] for t in edited["edited"]["prediction"]]
    assert chip_ids(page, ".pred-line.original")[0] == paris
    assert paris not in chip_ids(page, ".pred-line.edited")
    assert page.locator("#interventions li.iv").count() == 1
    assert page.locator("#trace-table").evaluate("t => t.classList.contains('is-edited')")

    # search a token: the same values as the API, the planted one first
    page.fill("#search-token", "␣Paris")
    page.click("#search-btn")
    rows = page.locator("#search-results tr.result")
    rows.first.wait_for()
    found = rows.locator("a.value-link").evaluate_all(
        "els => els.map(a => [Number(a.dataset.layer), Number(a.dataset.dim)])")
    assert found == [[r["layer"], r["dim"]] for r in explorer.search(" Paris")["results"]]
    assert found[0] == [LAYER, DIM]

    # the permalink: a new tab restores the prompt, the intervention, the edited trace and the value page
    link = page.url
    assert "#state=" in link
    again = page.context.new_page()
    again.goto(link)
    wait_traces(again, 1)
    assert again.input_value("#prompt") == PROMPT
    assert again.locator("#interventions li.iv").count() == 1
    assert chip_ids(again, ".pred-line.edited") == chip_ids(page, ".pred-line.edited")
    again.locator("#value-page h3").wait_for()
    assert page.js_errors == []


def test_a_bad_request_shows_its_one_line_error(page, base_url):
    page.goto(base_url)
    page.wait_for_function("() => document.getElementById('lens').options.length > 0")
    page.fill("#prompt", PROMPT)
    page.fill("#target", "zzzqqqxxxwww")
    page.click("#trace-btn")
    page.locator("#error").wait_for(state="visible")
    text = page.inner_text("#error-text")
    assert "not one token" in text and "\n" not in text.strip()
    assert page.locator("#trace-table tbody tr").count() == 0      # nothing half-rendered
    page.fill("#target", "")
    page.click("#trace-btn")
    wait_traces(page, 1)
    assert page.locator("#error").is_hidden()
