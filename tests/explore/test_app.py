"""The explorer's HTTP layer: the JSON API through Starlette's TestClient (fingerprints, 4xx JSON errors, the
access token), the static page, and 200 mixed good and bad requests from 8 concurrent clients against a real
server (every good one answered right, every bad one a one-line 4xx, the model unedited at the end)."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fflayers.embedding_space.value_index import ValueIndex
from fflayers.explore import Explorer, Notes, create_app, serve_in_thread

PROMPT = "The capital of France is the city of"


@pytest.fixture(scope="module")
def explorer(tiny_gpt2_dir, tmp_path_factory):
    from fflayers.backends.hf import load_hf_lm

    adapter = load_hf_lm(str(tiny_gpt2_dir), device="cpu")
    notes = Notes(tmp_path_factory.mktemp("notes") / "notes.sqlite")
    return Explorer(adapter, notes=notes, name="tiny-gpt2", values=ValueIndex(adapter))


@pytest.fixture(scope="module")
def client(explorer):
    from starlette.testclient import TestClient

    return TestClient(create_app(explorer))


def test_every_route_answers_with_the_fingerprint(client, explorer):
    fp = explorer.fingerprint
    info = client.get("/api/info").json()
    assert info["fingerprint"] == fp and info["n_layers"] == 2 and info["lenses"] == ["logit"]
    trace = client.post("/api/trace", json={"prompt": PROMPT, "k": 3}).json()
    assert trace["fingerprint"] == fp and len(trace["original"]["layers"]) == 2
    assert trace == {**explorer.trace(PROMPT, k=3), "fingerprint": fp}
    sub = client.post("/api/subupdates", json={"prompt": PROMPT, "layer": 1, "n": 4}).json()
    assert sub["fingerprint"] == fp and len(sub["by_magnitude"]) == 4
    gen = client.post("/api/generate", json={"prompt": PROMPT, "max_new_tokens": 3}).json()
    assert gen["edited"] is None and len(gen["original"]["tokens"]) == 3
    val = client.get("/api/value", params={"layer": 1, "dim": 4, "k": 5}).json()
    assert len(val["value"]["top"]) == 5 and val["fingerprint"] == fp
    note = client.post("/api/note", json={"layer": 1, "dim": 4, "name": "n", "note": "t"}).json()
    assert note["note"]["name"] == "n"
    assert client.get("/api/notes.csv").text.splitlines()[1].startswith("1,4,n,t,")
    tok = val["value"]["top"][0]["token"]
    found = client.get("/api/search", params={"token": tok}).json()
    assert any(r["layer"] == 1 and r["dim"] == 4 for r in found["results"])
    exp = client.post("/api/export", json={"prompt": PROMPT, "interventions": [
        {"kind": "value", "layer": 1, "dim": 4, "op": "off"}]}).json()
    assert "replace('mlp_coef', 1, 0.0, positions=None, index=[4])" in exp["python"]
    assert exp["json"]["interventions"][0]["dim"] == 4


def test_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert client.get("/static/plotly.min.js").status_code == 200
    assert client.get("/static/..%2Fapp.py").status_code == 404


@pytest.mark.parametrize("method, url, body, status, words", [
    ("post", "/api/trace", "{not json", 400, "not JSON"),
    ("post", "/api/trace", json.dumps([1, 2]), 400, "JSON object"),
    ("post", "/api/trace", json.dumps({"prompt": PROMPT, "lenz": "logit"}), 400, "unknown field 'lenz'"),
    ("post", "/api/trace", json.dumps({"prompt": "word " * 300}), 413, "at most 128"),
    ("post", "/api/trace", json.dumps({"prompt": PROMPT, "target": "zzzqqqxxxwww"}), 422, "not one token"),
    ("post", "/api/subupdates", json.dumps({"prompt": PROMPT, "layer": 7}), 422, "layer 7 out of range"),
    ("get", "/api/value?layer=0&dim=99", None, 422, "dim 99 out of range"),
    ("get", "/api/value?layer=x&dim=1", None, 400, "must be an integer"),
    ("get", "/api/search_keys?text=a", None, 404, "--memories"),
    ("get", "/api/nothing", None, 404, "unknown route"),
])
def test_bad_requests_get_one_line_json(client, explorer, method, url, body, status, words):
    r = client.request(method.upper(), url, content=body)
    assert r.status_code == status
    payload = r.json()
    assert words in payload["error"] and "\n" not in payload["error"]
    assert payload["fingerprint"] == explorer.fingerprint


def test_access_token(explorer):
    from starlette.testclient import TestClient

    client = TestClient(create_app(explorer, token="s3cret-token"))
    assert client.get("/api/info").status_code == 401
    assert client.get("/").status_code == 401
    assert client.get("/?token=s3cret-token").status_code == 200
    assert client.get("/api/info", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
    assert client.get("/api/info?access_token=s3cret-token").status_code == 200
    assert client.get("/static/explorer.js").status_code == 200  # package files are not secret


def test_concurrent_mixed_requests(explorer):
    import httpx

    adapter = explorer.adapter
    ids = torch.tensor([adapter.vocab.tokenize(PROMPT)])
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in adapter.model.modules())
    with torch.no_grad():
        before = adapter.log_probs(ids)
    want_trace = explorer.trace(PROMPT, k=3)
    want_edit = explorer.trace(PROMPT, k=3, interventions=[{"kind": "zero_sublayer", "sublayer": "mlp",
                                                             "layers": [1]}])
    good = [("trace", {"prompt": PROMPT, "k": 3}, want_trace),
            ("trace", {"prompt": PROMPT, "k": 3, "interventions": [
                {"kind": "zero_sublayer", "sublayer": "mlp", "layers": [1]}]}, want_edit)]
    bad = [("trace", {"prompt": "word " * 300}, 413), ("subupdates", {"prompt": PROMPT, "layer": 9}, 422),
           ("trace", {"prompt": PROMPT, "target": "qqqzzzxxxwww"}, 422), ("trace", "{oops", 400),
           ("value?layer=0&dim=1000", None, 422)]
    rng = random.Random(0)
    jobs = [rng.choice(good) if rng.random() < 0.5 else rng.choice(bad) for _ in range(200)]
    with serve_in_thread(explorer) as url:
        def send(job):
            route, body, want = job
            with httpx.Client(base_url=url, timeout=120) as c:
                if route.startswith("value"):
                    r = c.get(f"/api/{route}")
                else:
                    content = body if isinstance(body, str) else json.dumps(body)
                    r = c.post(f"/api/{route}", content=content)
            if isinstance(want, dict):
                return r.status_code == 200 and r.json() == {**want, "fingerprint": explorer.fingerprint}
            return r.status_code == want and "\n" not in r.json()["error"]

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(send, jobs))
        with httpx.Client(base_url=url) as c:
            assert c.get("/api/info").status_code == 200  # still alive
    assert all(results), f"{results.count(False)} of 200 requests answered wrongly"
    with torch.no_grad():
        assert torch.equal(adapter.log_probs(ids), before)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in adapter.model.modules()) == hooks
