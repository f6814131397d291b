"""The explorer's answers against independent computations on tiny GPT-2, Llama and fairseq models: the trace
against ``project`` of captured states, sub-updates against ``ffn_values`` and captured coefficients, every
intervention against the same edit made with ``fflayers.hooks``, the search against a pandas filter of an
export; no hook is left on the model after any request."""

from __future__ import annotations

import pytest
import torch

from fflayers.embedding_space.value_index import ValueIndex
from fflayers.explore import Explorer, Notes, RequestError
from fflayers.hooks import block_attention, capture, intervene, replace, scale
from fflayers.memories.index import MemoryIndex
from tests.fixtures.fairseq_models import needs_fairseq

PROMPTS = {"gpt2": "The capital of France is the city of", "llama": "Water is made of hydrogen and",
           "fairseq": "John built the old tower in"}


def n_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A random Llama with the GPT-2 BPE vocabulary (GPT-2's tokenizer: a real one for typed prompts)."""
    import transformers as tf

    d = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(1)
    cfg = tf.LlamaConfig(vocab_size=50257, hidden_size=16, intermediate_size=32, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=128,
                         bos_token_id=50256, eos_token_id=50256)
    model = tf.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module", params=["gpt2", "llama", pytest.param("fairseq", marks=needs_fairseq)])
def case(request, tiny_gpt2_dir, tiny_llama_dir):
    if request.param == "fairseq":
        adapter = request.getfixturevalue("fairseq_adapters")("fairseq_prenorm_lm")
    else:
        from fflayers.backends.hf import load_hf_lm

        d = tiny_gpt2_dir if request.param == "gpt2" else tiny_llama_dir
        adapter = load_hf_lm(str(d), device="cpu", tokenizer_path=str(tiny_gpt2_dir))
    # edge blocking installs its routes once, for good (they act only while a mask is set): install them
    # before counting hooks
    adapter.prepare_edge_blocking()
    return request.param, adapter, Explorer(adapter, load_code="")


def ids_of(adapter, prompt):
    return torch.tensor([adapter.vocab.tokenize(prompt)])


@torch.no_grad()
def test_trace_equals_projection_of_captured_states(case):
    name, adapter, ex = case
    prompt = PROMPTS[name]
    before = n_hooks(adapter.model)
    out = ex.trace(prompt, position=-2, k=5)
    assert n_hooks(adapter.model) == before
    ids = ids_of(adapter, prompt)
    with capture(adapter, ["resid_pre", "attn_out", "resid_post"]) as c:
        lp = adapter.log_probs(ids)[0, -2]
    assert out["position"] == ids.shape[1] - 2
    assert out["tokens"] == adapter.vocab.id_to_token(ids[0].tolist())
    assert [p["id"] for p in out["original"]["prediction"]] == lp.topk(5).indices.tolist()
    target = int(lp.argmax())
    assert out["target"]["id"] == target
    for layer, row in enumerate(out["original"]["layers"]):
        pre = c["resid_pre", layer][0, -2]
        states = {"resid_pre": pre, "attn": pre + c["attn_out", layer][0, -2],
                  "mlp": c["resid_post", layer][0, -2]}
        for point, h in states.items():
            plp = adapter.project(h[None])[0]
            assert [t["id"] for t in row[point]] == plp.topk(5).indices.tolist()
            assert row[point][0]["prob"] == pytest.approx(float(plp.max().exp()), rel=1e-4)
            assert row["target"][point]["rank"] == int((plp > plp[target]).sum())
    # the last block's output through the model's own head is the prediction itself
    last = out["original"]["layers"][-1]
    assert last["target"]["mlp"]["rank"] == 0
    assert out["edited"] is None


@torch.no_grad()
def test_trace_through_mat_equals_maps_applied_by_hand(case):
    """The mat lens reads state l as the head of ``A_{L,l} h`` (maps planted at random); a repeated trace is
    served from the kept unedited run and equals the first one, even after the caller edits its answer."""
    from fflayers.lenses import LinearShortcutLens

    name, adapter, _ = case
    L, d = adapter.n_layers, adapter.d_model
    g = torch.Generator().manual_seed(3)
    maps = {(L, i): torch.randn(d, d, generator=g) / d**0.5 for i in range(L)}
    ex = Explorer(adapter, load_code="", lenses={"mat": LinearShortcutLens(adapter, maps)})
    prompt = PROMPTS[name]
    out = ex.trace(prompt, lens="mat", k=4)
    with capture(adapter, ["resid_pre", "attn_out", "resid_post"]) as c:
        adapter.log_probs(ids_of(adapter, prompt))
    target = out["target"]["id"]
    for layer, row in enumerate(out["original"]["layers"]):
        pre = c["resid_pre", layer][0, -1]
        states = {"resid_pre": (pre, layer), "attn": (pre + c["attn_out", layer][0, -1], layer + 1),
                  "mlp": (c["resid_post", layer][0, -1], layer + 1)}
        for point, (h, state) in states.items():
            mapped = h if state == L else maps[L, state] @ h
            plp = adapter.project(mapped[None])[0]
            assert [t["id"] for t in row[point]] == plp.topk(4).indices.tolist()
            assert row[point][0]["prob"] == pytest.approx(float(plp.max().exp()), rel=1e-4)
            assert row["target"][point]["rank"] == int((plp > plp[target]).sum())
    first = ex.trace(prompt, lens="mat", k=4)
    first["original"]["layers"].clear()
    assert ex.trace(prompt, lens="mat", k=4) == out


@torch.no_grad()
def test_subupdates_equal_recomputation(case):
    name, adapter, ex = case
    prompt, layer = PROMPTS[name], adapter.n_layers - 1
    ids = ids_of(adapter, prompt)
    with capture(adapter, "mlp_coef", layers=[layer]) as c:
        lp = adapter.log_probs(ids)[0, -1]
    coef = c["mlp_coef", layer][0, -1].float()
    values = adapter.ffn_values(layer).float()
    target = int(lp.topk(2).indices[1])
    token = adapter.vocab.id_to_token([target])[0]
    out = ex.subupdates(prompt, layer, target=token, n=6, k=3)
    score = coef.abs() * values.norm(dim=1)
    contribution = coef * (values @ adapter.output_embeddings()[target].float())
    assert [r["dim"] for r in out["by_magnitude"]] == score.topk(6).indices.tolist()
    assert [r["dim"] for r in out["by_target"]] == contribution.topk(6).indices.tolist()
    first = out["by_magnitude"][0]
    assert first["coef"] == pytest.approx(float(coef[first["dim"]]), rel=1e-5)
    assert first["top_tokens"] == adapter.vocab.id_to_token(
        adapter.project(values[first["dim"]][None])[0].topk(3).indices.tolist())


def _edited_lp(adapter, prompt, edits=(), blocked=None):
    ids = ids_of(adapter, prompt)
    with torch.no_grad(), intervene(adapter, list(edits)), block_attention(adapter, blocked or {}):
        return adapter.log_probs(ids)[0, -1]


@pytest.mark.parametrize("kind", ["off", "set", "scale", "zero_attn", "zero_mlp", "block"])
def test_every_intervention_equals_the_hooks_edit(case, kind):
    name, adapter, ex = case
    prompt = PROMPTS[name]
    T = ids_of(adapter, prompt).shape[1]
    L = adapter.n_layers - 1
    top = ex.subupdates(prompt, L, n=1)["by_magnitude"][0]["dim"]
    if kind == "off":
        ivs = [{"kind": "value", "layer": L, "dim": top, "op": "off"}]
        edits = [replace("mlp_coef", L, 0.0, index=[top])]
    elif kind == "set":
        ivs = [{"kind": "value", "layer": L, "dim": top, "op": "set", "value": 7.5, "positions": [-1]}]
        edits = [replace("mlp_coef", L, 7.5, positions=[T - 1], index=[top])]
    elif kind == "scale":
        ivs = [{"kind": "value", "layer": 0, "dim": 3, "op": "scale", "value": -4.0}]
        edits = [scale("mlp_coef", 0, -4.0, index=[3])]
    elif kind in ("zero_attn", "zero_mlp"):
        sub = kind[5:]
        ivs = [{"kind": "zero_sublayer", "sublayer": sub, "layers": [0, L]}]
        edits = [scale(f"{sub}_out", layer, 0.0) for layer in (0, L)]
    else:
        ivs = [{"kind": "block_attention", "layers": [0, L], "from": [-1], "to": [1, 2]}]
        mask = torch.zeros(T, T, dtype=torch.bool)
        mask[T - 1, [1, 2]] = True
        edits = []
    blocked = {0: mask, L: mask} if kind == "block" else None
    before = n_hooks(adapter.model)
    out = ex.trace(prompt, k=5, interventions=ivs)
    assert n_hooks(adapter.model) == before
    lp = _edited_lp(adapter, prompt, edits, blocked)
    got = out["edited"]["prediction"]
    assert [p["id"] for p in got] == lp.topk(5).indices.tolist()
    assert got[0]["prob"] == pytest.approx(float(lp.max().exp()), rel=1e-4, abs=1e-6)
    # the edit changed something, and the original run is the unedited model
    orig = _edited_lp(adapter, prompt)
    assert out["original"]["prediction"][0]["prob"] == pytest.approx(float(orig.max().exp()), rel=1e-4)
    assert not torch.allclose(lp, orig, atol=1e-7)
    # the exported snippet reproduces the edited prediction
    snippet = ex.export(prompt, ivs)["python"]
    scope = {"adapter": adapter}
    exec(compile(snippet, "<snippet>", "exec"), scope)
    assert torch.allclose(scope["lp"], lp, atol=1e-5)
    assert n_hooks(adapter.model) == before


def test_generation_under_an_intervention_equals_a_hand_written_loop(case):
    name, adapter, ex = case
    prompt = PROMPTS[name]
    ivs = [{"kind": "zero_sublayer", "sublayer": "mlp", "layers": [0]}]
    out = ex.generate(prompt, max_new_tokens=4, interventions=ivs)
    ids = adapter.vocab.tokenize(prompt)
    with torch.no_grad(), intervene(adapter, [scale("mlp_out", 0, 0.0)]):
        for _ in range(len(out["edited"]["tokens"])):
            ids.append(int(adapter.log_probs(torch.tensor([ids]))[0, -1].argmax()))
    assert out["edited"]["tokens"] == adapter.vocab.id_to_token(ids[-len(out["edited"]["tokens"]):])
    assert len(out["original"]["tokens"]) >= 1


def test_value_page_and_search_equal_a_pandas_filter(case, tmp_path):
    import pandas as pd

    from fflayers.embedding_space.projections import neuron_tokens
    from fflayers.embedding_space.vocabulary import embedding_matrix
    from fflayers.io import write_table

    name, adapter, _ = case
    E = embedding_matrix(adapter, "output")
    table = neuron_tokens(adapter, E, list(range(adapter.n_layers)), k=6)
    export = tmp_path / "values.parquet"
    write_table(export, table)
    ex = Explorer(adapter, values=ValueIndex(adapter, export))
    values = table[table.side == "value"]
    token_id = int(values.token_id.value_counts().index[0])  # the token in most values' top lists
    got = ex.search(adapter.vocab.id_to_token([token_id])[0], limit=100)
    want = values[values.token_id == token_id].sort_values(["rank", "score"], ascending=[True, False])
    want = want.head(100)
    assert [(r["layer"], r["dim"], r["rank"]) for r in got["results"]] == list(
        zip(want.layer, want.neuron, want["rank"], strict=True))
    assert got["results"][0]["score"] == pytest.approx(want.score.iloc[0])
    # the computed index (no export) gives the same hits
    computed = Explorer(adapter, values=ValueIndex(adapter, k=6)).search(got["token"], limit=100)
    pairs = [(r["layer"], r["dim"]) for r in got["results"]]
    assert [(r["layer"], r["dim"]) for r in computed["results"]] == pairs
    page = ex.value(1, 5, k=4)
    key = adapter.ffn_keys(1)[5].float()
    scores = E.matrix.float() @ key
    assert [t["id"] for t in page["key"]["top"]] == scores.topk(4).indices.tolist()
    assert [t["id"] for t in page["key"]["bottom"]] == scores.topk(4, largest=False).indices.tolist()
    assert isinstance(pd.DataFrame(page["value"]["top"]).score.iloc[0], float)


def test_memories_notes_and_key_search(tmp_path, tiny_gpt2_dir):
    from fflayers.backends.hf import load_hf_lm
    from fflayers.memories.textual import format_line

    adapter = load_hf_lm(str(tiny_gpt2_dir), device="cpu")
    d = tmp_path / "textual"
    d.mkdir()
    (d / "5_1.txt").write_text(format_line(3.5, "the capital of", "France") + "\n"
                               + format_line(1.25, "a river in", "Spain") + "\n")
    (d / "7_0.txt").write_text(format_line(9.0, "the Capital city", "Rome") + "\n")
    neurons = tmp_path / "results.json"
    neurons.write_text('{"facts": [{"uuid": "u1", "relation": "capital", "answer": "Paris", '
                       '"neurons": [[1, 5], [0, 2]]}]}')
    notes_path = tmp_path / "notes.sqlite"
    ex = Explorer(adapter, memories=MemoryIndex(d, neurons=neurons), notes=Notes(notes_path))
    page = ex.value(1, 5)
    assert page["triggers"] == [{"activation": 3.5, "prefix": "the capital of", "target": "France"},
                                {"activation": 1.25, "prefix": "a river in", "target": "Spain"}]
    assert page["neurons"] == [{"uuid": "u1", "relation": "capital", "answer": "Paris"}]
    assert ex.value(0, 1)["triggers"] == [] and ex.value(0, 1)["neurons"] == []
    hits = ex.search_keys("capital", limit=10)["results"]
    assert [(h["layer"], h["dim"], h["activation"]) for h in hits] == [(0, 7, 9.0), (1, 5, 3.5)]
    ex.save_note(1, 5, "capitals", "fires on 'capital of'")
    # a restarted server (a new Notes on the same file) still has the note
    again = Explorer(adapter, notes=Notes(notes_path))
    assert again.value(1, 5)["note"]["name"] == "capitals"
    csv = again.notes.to_csv(again.fingerprint).splitlines()
    assert csv[0] == "layer,dim,name,note,updated" and csv[1].startswith("1,5,capitals,")


def test_bad_requests_are_one_line_errors(tiny_gpt2_dir):
    from fflayers.backends.hf import load_hf_lm

    adapter = load_hf_lm(str(tiny_gpt2_dir), device="cpu")
    ex = Explorer(adapter)
    cases = [
        (lambda: ex.trace("  "), "empty", 422),
        (lambda: ex.trace("word " * 200), "at most 128", 413),
        (lambda: ex.trace("Hello", position=9), "out of range", 422),
        (lambda: ex.trace("Hello", target="notasingletokenatall"), "not one token", 422),
        (lambda: ex.trace("Hello", lens="tuned"), "unknown", 422),
        (lambda: ex.trace("Hello", interventions=[{"kind": "value", "layer": 2, "dim": 0}]), "layer 2", 422),
        (lambda: ex.trace("Hello", interventions=[{"kind": "value", "layer": 0, "dim": 32}]), "dim 32", 422),
        (lambda: ex.trace("Hello", interventions=[{"kind": "bogus"}]), "kind", 400),
        (lambda: ex.subupdates("Hello", layer=-1), "layer -1", 422),
        (lambda: ex.value(0, 10**6), "out of range", 422),
        (lambda: ex.search_keys("x"), "--memories", 404),
    ]
    for call, words, status in cases:
        with pytest.raises(RequestError, match=words) as err:
            call()
        assert err.value.status == status
        assert "\n" not in str(err.value)
