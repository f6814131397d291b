"""Trigger mining: planted answer, brute force over unbatched runs, resume, JSONL schema."""

from __future__ import annotations

import json
import random

import pytest
import torch

from fflayers.backends.hf import HFAdapter
from fflayers.core import FflayersError, RunStateError
from fflayers.memories.trigger_examples import trigger_examples
from tests.fixtures.hf_models import tiny_model


def ffn_in_module(adapter: HFAdapter, layer: int) -> torch.nn.Module:
    """The module whose output is the key pre-activation (read from the model directly, not via fflayers)."""
    block = adapter.blocks[layer]
    return block.mlp.c_fc if adapter.family == "gpt2" else block.mlp.gate_proj


def key_columns(per_sentence: list[dict[int, torch.Tensor]], layers, dims) -> dict:
    """``{(layer, dim): [activations of the key at each position, per sentence]}``."""
    return {(layer, dim): [acts[layer][:, dim].tolist() for acts in per_sentence]
            for layer in layers for dim in dims}


def brute_force(adapter: HFAdapter, sentences, layers=None, dims=None) -> dict:
    """Key activations of each sentence run alone (no batching, no padding), via plain torch hooks."""
    layers = list(range(adapter.n_layers)) if layers is None else layers
    dims = list(range(adapter.d_ff)) if dims is None else dims
    per_sentence = []
    for seq in sentences:
        acts = {}
        handles = [ffn_in_module(adapter, layer).register_forward_hook(
            lambda _m, _a, out, layer=layer, acts=acts: acts.__setitem__(layer, out[0].detach()))
            for layer in layers]
        try:
            with torch.no_grad():
                adapter.model(input_ids=torch.tensor([seq]))
        finally:
            for h in handles:
                h.remove()
        per_sentence.append(acts)
    return key_columns(per_sentence, layers, dims)


def expected_topk(cols: list[list[float]], k: int) -> list[tuple[float, int, int]]:
    """Brute-force top-k of one key: positive sentence maxima by (value desc, id asc), first argmax."""
    cands = [(max(c), s, c.index(max(c))) for s, c in enumerate(cols) if max(c) > 0]
    cands.sort(key=lambda c: (-c[0], c[1]))
    return cands[:k]


def check_key(got: list[tuple[float, int, int]], cols: list[list[float]], k: int, rel=1e-5,
              abs_=1e-6) -> None:
    """``got`` is a correct top-k of a key with activations ``cols``, up to float noise: its values are the
    k largest sentence maxima, each entry's position holds its sentence's maximum, no sentence twice.
    (Batched and single runs differ in the last bits, so exact ties, e.g. sentences sharing a prefix,
    may come out in either order.)"""
    exp = expected_topk(cols, k)
    assert [v for v, _, _ in got] == pytest.approx([v for v, _, _ in exp], rel=rel, abs=abs_)
    assert len({s for _, s, _ in got}) == len(got)
    for v, s, p in got:
        assert cols[s][p] == pytest.approx(v, rel=rel, abs=abs_)
        assert max(cols[s]) == pytest.approx(v, rel=rel, abs=abs_)


def random_sentences(n: int, vocab: int, seed: int, lo: int = 2, hi: int = 20) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def assert_matches(te, columns: dict) -> None:
    for (layer, dim), cols in columns.items():
        check_key(te.examples(layer, dim), cols, te.k)


@pytest.fixture(scope="module")
def gpt2_adapter():
    return HFAdapter(tiny_model("gpt2"), device="cpu")


@pytest.fixture(scope="module")
def corpus():
    return random_sentences(23, 97, seed=3)


@pytest.fixture(scope="module")
def expected(gpt2_adapter, corpus):
    return brute_force(gpt2_adapter, corpus)


# ----- planted answer ---------------------------------------------------------------------------------------


def test_planted_key_triggers_exactly_on_x(planted):
    rng = random.Random(0)
    others = [t for t in range(1, 40) if t != planted.x]
    sentences, where = [], {}
    for i in range(40):
        seq = [rng.choice(others) for _ in range(rng.randint(3, 15))]
        if i % 4 == 1:
            pos = 0 if i == 1 else rng.randrange(len(seq))  # X at position 0 in one sentence
            seq[pos] = planted.x
            where[i] = pos
        sentences.append(seq)
    twice = [planted.x if j in (2, 5) else t for j, t in enumerate(sentences[3])]
    sentences[3] = twice  # equal activations at 2 and 5: first position wins
    where[3] = 2
    te = trigger_examples(planted.adapter, sentences, k=30, batch_tokens=50, progress=False)
    got = te.examples(planted.layer, planted.neuron)
    assert sorted((s, p) for _, s, p in got) == sorted(where.items())
    assert all(v > 0 for v, _, _ in got)
    if len({v for v, _, _ in got}) == 1:  # X occurrences computed bit-identically: ties by sentence id
        assert [s for _, s, _ in got] == sorted(where)


# ----- brute force -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_tokens", [1, 37, 100_000])
def test_matches_brute_force_for_any_batching(gpt2_adapter, corpus, expected, batch_tokens):
    te = trigger_examples(gpt2_adapter, corpus, k=6, batch_tokens=batch_tokens, progress=False, shard_size=10)
    assert te.values.shape == (gpt2_adapter.n_layers * gpt2_adapter.d_ff, 6)
    assert_matches(te, expected)


def test_layer_and_dim_selection(gpt2_adapter, corpus, expected):
    layers, dims = [2, 0], [5, 1, 63]
    te = trigger_examples(gpt2_adapter, corpus, k=6, layers=layers, dims=dims, batch_tokens=64,
                          progress=False)
    assert te.layers == layers and te.dims == dims
    assert_matches(te, {key: expected[key] for key in expected if key[0] in layers and key[1] in dims})
    frame = te.to_frame()
    assert list(frame.columns) == ["layer", "dim", "rank", "sentence_id", "position", "value"]
    sub = frame[(frame.layer == 2) & (frame.dim == 63)].sort_values("rank")
    assert list(zip(sub.value, sub.sentence_id, sub.position, strict=True)) == te.examples(2, 63)


def test_llama_with_gate_keys():
    adapter = HFAdapter(tiny_model("llama"), device="cpu")
    sentences = random_sentences(11, 97, seed=5)
    te = trigger_examples(adapter, sentences, k=4, batch_tokens=40, progress=False)
    assert_matches(te, brute_force(adapter, sentences))


# ----- resume -----------------------------------------------------------------------------------------------


def test_resume_after_interruption_recomputes_only_unfinished_units(gpt2_adapter, corpus, expected, tmp_path,
                                                                    monkeypatch):
    from fflayers.memories.trigger_examples import TriggerScan
    from fflayers.runs import MANIFEST

    kwargs = dict(k=6, batch_tokens=60, progress=False, shard_size=5)
    units: list[int] = []
    calls = {"fail_at": None}
    real_mine = TriggerScan.mine

    def counting_mine(self, batches, topk, progress=None):
        for u in batches:
            if len(units) == calls["fail_at"]:
                raise RuntimeError("interrupted")
            units.append(u)
            real_mine(self, [u], topk, progress)
        return topk

    monkeypatch.setattr(TriggerScan, "mine", counting_mine)
    full = trigger_examples(gpt2_adapter, corpus, **kwargs)
    n_units = len(units)
    assert sorted(units) == list(range(n_units)) and n_units >= 5

    units.clear()
    calls["fail_at"] = n_units // 2 + 1
    with pytest.raises(RuntimeError, match="interrupted"):
        trigger_examples(gpt2_adapter, corpus, checkpoint_dir=tmp_path, **kwargs)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    status = [s["status"] for s in manifest["shards"]]
    assert manifest["kind"] == "trigger_examples" and "done" in status and "running" in status, status
    pending = [u for s in manifest["shards"] if s["status"] != "done" for u in range(*s["units"])]
    assert 0 < len(pending) < n_units

    units.clear()
    calls["fail_at"] = None
    resumed = trigger_examples(gpt2_adapter, corpus, checkpoint_dir=tmp_path, **kwargs)
    assert sorted(units) == pending  # the finished shards were loaded, not computed again
    assert torch.equal(resumed.values, full.values)
    assert torch.equal(resumed.sentence_ids, full.sentence_ids)
    assert torch.equal(resumed.positions, full.positions)
    assert_matches(resumed, expected)

    units.clear()
    again = trigger_examples(gpt2_adapter, corpus, checkpoint_dir=tmp_path, **kwargs)
    assert units == [] and torch.equal(again.sentence_ids, full.sentence_ids)  # a finished run: all reused


def test_resume_refuses_other_settings(gpt2_adapter, corpus, tmp_path):
    kwargs = dict(batch_tokens=60, progress=False, shard_size=5, checkpoint_dir=tmp_path)
    trigger_examples(gpt2_adapter, corpus, k=6, **kwargs)
    with pytest.raises(RunStateError, match=r"differs in: k\); k is 5 here, 6 in the run folder"):
        trigger_examples(gpt2_adapter, corpus, k=5, **kwargs)
    with pytest.raises(RunStateError, match=r"differs in: data, n_sentences\)"):
        trigger_examples(gpt2_adapter, corpus[:-1], k=6, **kwargs)
    edited = [list(s) for s in corpus]
    edited[3][0] = edited[3][0] % 90 + 1
    with pytest.raises(RunStateError, match=r"differs in: data\)"):
        trigger_examples(gpt2_adapter, edited, k=6, **kwargs)
    with pytest.raises(RunStateError, match=r"differs in: model\)"):
        trigger_examples(HFAdapter(tiny_model("gpt2", seed=1), device="cpu"), corpus, k=6, **kwargs)


# ----- torch.distributed -----------------------------------------------------------------------------------


def _distributed_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        adapter = HFAdapter(tiny_model("gpt2"), device="cpu")
        te = trigger_examples(adapter, random_sentences(23, 97, seed=3), k=6, batch_tokens=60, progress=False,
                              shard_size=4, distributed=True)
        try:  # inside a group of ranks, a call that does not split the work is refused
            trigger_examples(adapter, [[1, 2]], k=1, progress=False)
            refused = ""
        except FflayersError as err:
            refused = str(err)
        torch.save({"values": te.values, "ids": te.sentence_ids, "pos": te.positions, "refused": refused},
                   f"{out}.{rank}")
        dist.barrier()  # no rank tears its connections down while a peer still talks to it
    finally:
        dist.destroy_process_group()


def test_distributed_ranks_merge_to_single_process_result(gpt2_adapter, corpus, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "out")),
             nprocs=2, join=True)
    single = trigger_examples(gpt2_adapter, corpus, k=6, batch_tokens=60, progress=False, shard_size=4)
    for rank in range(2):
        got = torch.load(tmp_path / f"out.{rank}", weights_only=True)
        assert "group of 2 ranks; pass distributed=True" in got["refused"]
        assert torch.equal(got["ids"], single.sentence_ids)
        assert torch.equal(got["pos"], single.positions)
        # thread counts differ between the processes: last-bit differences in the activations
        assert torch.allclose(got["values"], single.values, rtol=1e-5, atol=1e-7)


# ----- output schema ----------------------------------------------------------------------------------------


def test_jsonl_rows_original_schema(planted):
    sentences = [[1, planted.x, 3], [4, 5], [planted.x, 9, 9, 9]]
    texts = ["a X c", "d e", "X i i i"]
    te = trigger_examples(planted.adapter, sentences, k=5, dims=[planted.neuron, 0], progress=False)
    rows = list(te.to_jsonl_rows(texts))
    assert [r["dim"] for r in rows] == [planted.neuron, 0]
    layer_lists = rows[0]["top_values"]
    assert len(layer_lists) == planted.adapter.n_layers
    recs = layer_lists[planted.layer]
    assert [(r["rank"], r["layer_index"], r["token_indice"], r["text"]) for r in recs] == [
        (0, planted.layer, 1, "a X c"), (1, planted.layer, 0, "X i i i")]  # 2 < k records: only positives
    assert recs[0]["fc1_value"] == pytest.approx(te.examples(planted.layer, planted.neuron)[0][0])
    assert all(isinstance(r["fc1_value"], float) and isinstance(r["token_indice"], int) for r in recs)
    with pytest.raises(FflayersError):
        list(te.to_jsonl_rows(texts[:2]))


def test_bad_arguments(gpt2_adapter, corpus):
    with pytest.raises(FflayersError, match="out of range"):
        trigger_examples(gpt2_adapter, corpus, dims=[gpt2_adapter.d_ff], progress=False)
    with pytest.raises(FflayersError, match="out of range"):
        trigger_examples(gpt2_adapter, corpus, layers=[7], progress=False)
    with pytest.raises(FflayersError, match="k=0"):
        trigger_examples(gpt2_adapter, corpus, k=0, progress=False)
    with pytest.raises(FflayersError, match="no sentences"):
        trigger_examples(gpt2_adapter, [], progress=False)


def test_repr_html_is_the_long_table():
    """Jupyter shows a TriggerExamples as the table of its filled slots (built here from the buffers)."""
    import numpy as np
    import pandas as pd

    from fflayers.memories.trigger_examples import TriggerExamples

    values = torch.tensor([[3.5, 1.25, -float("inf")], [-float("inf")] * 3, [0.5, 0.25, 0.125],
                           [2.0, -float("inf"), -float("inf")]])
    sentence_ids = torch.tensor([[4, 0, -1], [-1, -1, -1], [1, 2, 3], [7, -1, -1]])
    positions = torch.tensor([[2, 0, -1], [-1, -1, -1], [5, 1, 1], [3, -1, -1]])
    te = TriggerExamples(values, sentence_ids, positions, layers=[3, 1], dims=[10, 20], k=3, n_sentences=8)
    rows = []
    for li, layer in enumerate(te.layers):
        for di, dim in enumerate(te.dims):
            key = li * len(te.dims) + di
            for rank in range(te.k):
                if int(sentence_ids[key, rank]) >= 0:
                    rows.append((layer, dim, rank, int(sentence_ids[key, rank]), int(positions[key, rank]),
                                 float(values[key, rank])))
    expected = pd.DataFrame(rows, columns=["layer", "dim", "rank", "sentence_id", "position", "value"])
    expected = expected.astype({c: np.int64 for c in expected.columns[:5]} | {"value": np.float32})
    assert len(expected) == 6
    assert te._repr_html_() == expected._repr_html_()
    assert "<table" in te._repr_html_()
