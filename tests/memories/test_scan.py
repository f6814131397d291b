"""Scan plans, the manifest, automatic batch size, and sharded mining equal to one pass (planted shard
splits)."""

from __future__ import annotations

import types

import pytest
import torch

from fflayers.backends.hf import HFAdapter
from fflayers.core import RunStateError
from fflayers.memories.scan import ScanConfig, auto_batch_tokens, run_scan
from fflayers.memories.trigger_examples import TriggerScan, trigger_examples
from fflayers.runs import Manifest, choose_n_shards, group_units
from tests.fixtures.hf_models import tiny_model
from tests.memories.test_trigger_examples import brute_force, random_sentences


@pytest.mark.parametrize("n_units,n_sent,workers,want", [
    (3, 300, 2, 3),          # fewer units than 4 per worker: one shard per unit
    (100, 300, 2, 8),        # a few hundred sentences: 4 shards per worker, every worker gets work
    (1000, 1_000_000, 2, 100),  # large runs: about 10,000 sentences per shard
    (1, 5, 8, 1),
])
def test_choose_n_shards(n_units, n_sent, workers, want):
    assert choose_n_shards(n_units, n_sent, workers) == want


def test_group_units():
    assert group_units([3, 3, 3, 1, 5], 5) == [range(0, 2), range(2, 5)]  # 3+1 < 5: the block goes on
    assert group_units([1, 1, 1], 10) == [range(0, 3)]
    assert group_units([], 4) == []


def test_manifest_refuses_another_configuration(tmp_path):
    man = Manifest(tmp_path / "run")
    plan = {"shards": [[0, 2], [2, 3]], "shard_weights": [5, 4], "unit_name": "sentences"}
    data = man.open("x", {"k": 3}, "hash-a", lambda: plan)
    assert [s["status"] for s in data["shards"]] == ["pending", "pending"] and data["left"]["sentences"] == 9
    man.update(1, status="done")
    assert man.read()["left"] == {"shards": 1, "sentences": 5}
    assert man.open("x", {"k": 3}, "hash-a",
                    lambda: pytest.fail("plan rebuilt"))["shards"][1]["status"] == "done"
    with pytest.raises(RunStateError, match=r"another configuration \(differs in: k\)"):
        man.open("x", {"k": 4}, "hash-b", lambda: plan)


def test_auto_batch_tokens(monkeypatch):
    cpu = types.SimpleNamespace(device=torch.device("cpu"), d_model=1024, d_ff=4096)
    assert auto_batch_tokens(cpu) == 4096
    gpu = types.SimpleNamespace(device=torch.device("cuda", 0), d_model=1024, d_ff=4096)
    per_token = 4 * (32 * 1024 + 8 * 4096)  # 262,144 bytes
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * 2**30, 80 * 2**30))
    assert auto_batch_tokens(gpu) == 65536 == 2 ** int(
        torch.tensor(0.5 * 40 * 2**30 / per_token).log2().floor())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**20, 80 * 2**30))
    assert auto_batch_tokens(gpu) == 1024  # floor


def test_sharded_scan_equals_one_pass_and_resumes(tmp_path):
    adapter = HFAdapter(tiny_model("gpt2"), device="cpu")
    sents = random_sentences(30, 97, seed=5)
    layers, dims = [0, 1], list(range(adapter.d_ff))

    def make(bt):
        return TriggerScan(adapter, sents, 4, layers, dims, bt)

    one = make(60)
    whole = one.result(one.run_units(range(one.n_units))).sentence_ids
    config = ScanConfig("trigger_examples", layers, dims, len(sents), k=4)
    out = run_scan(make, 60, config, run_dir=tmp_path / "run", progress=False)
    assert out.plan["n_shards"] == min(one.n_units, 4) and out.computed_all == out.plan["n_shards"]
    assert torch.equal(one.result(out.result).sentence_ids, whole)
    again = run_scan(make, 60, config, run_dir=tmp_path / "run", progress=False)
    assert again.computed_all == 0 and again.reused == out.plan["n_shards"]
    assert torch.equal(one.result(again.result).sentence_ids, whole)


def test_bf16_autocast_matches_an_autocast_brute_force():
    adapter = HFAdapter(tiny_model("gpt2"), device="cpu")
    sents = random_sentences(12, 97, seed=7)
    te = trigger_examples(adapter, sents, k=3, batch_tokens=60, progress=False, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cols = brute_force(adapter, sents)
    for (layer, dim), per_sentence in cols.items():
        best = sorted((max(c) for c in per_sentence if max(c) > 0), reverse=True)[:3]
        got = [v for v, _, _ in te.examples(layer, dim)]
        assert got == pytest.approx(best, rel=2e-2, abs=2e-2)  # bf16 rounding differs between batch shapes
