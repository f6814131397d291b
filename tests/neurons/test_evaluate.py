"""Knowledge-neuron evaluation: baselines and unrelated facts, rows recomputed with raw hooks, summary means
by hand, and SmolLM2's refined neurons against random ones."""

from __future__ import annotations

import math
import random

import pandas as pd
import pytest
import torch

from fflayers.backends.hf import load_hf_lm
from fflayers.neurons.evaluate import (
    SearchConfig,
    UnrelatedFallbackWarning,
    evaluate_fact,
    find_neurons,
    pick_unrelated,
    random_neurons,
    summarize,
    summary_table,
)
from fflayers.neurons.facts import ParaphraseFact, countries_paraphrases, load_relations

FACTS = [
    ParaphraseFact("c-fr", "capital", ("The capital of France is", "France's capital is"), "Paris"),
    ParaphraseFact("c-de", "capital", ("The capital of Germany is", "Germany's capital is"), "Berlin"),
    ParaphraseFact("l-fr", "language", ("In France people speak",), "French"),
]


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    return load_hf_lm(str(tiny_gpt2_dir), device="cpu")


def test_random_neurons_match_layers_and_avoid_the_refined():
    refined = [[0, 1], [0, 2], [3, 5]]
    got = random_neurons(refined, d_ff=6, rng=random.Random(0))
    assert sorted(layer for layer, _ in got) == [0, 0, 3]
    assert not {tuple(n) for n in got} & {tuple(n) for n in refined}
    assert got == random_neurons(refined, d_ff=6, rng=random.Random(0))
    assert random_neurons([], 6, random.Random(0)) == []


def test_unrelated_facts_come_from_another_relation():
    for seed in range(5):
        assert pick_unrelated(FACTS, FACTS[0], seed).relation == "language"
        assert pick_unrelated(FACTS, FACTS[2], seed).relation == "capital"
    same = FACTS[:2]
    with pytest.warns(UnrelatedFallbackWarning, match="'capital'.* c-fr come from c-de"):
        assert pick_unrelated(same, same[0]).uuid == "c-de"  # one relation only: another fact, another answer
    with pytest.warns(UnrelatedFallbackWarning, match="c-fr has no unrelated prompts"):
        assert pick_unrelated(FACTS[:1], FACTS[0]) is None


def raw_prob(model, tokenizer, prompt: str, answer: str, edits: dict[int, list[int]] | None = None,
             factor: float = 1.0, pre_activation: bool = False) -> float:
    """P(answer | prompt) with GPT-2's own modules: answer tokens teacher-forced, ``c_proj`` inputs (or, with
    ``pre_activation``, ``c_fc`` outputs) scaled at the positions predicting the answer."""
    p_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + " " + answer)["input_ids"]
    positions = list(range(len(p_ids) - 1, len(ids) - 1))
    handles = []
    for layer, idx in (edits or {}).items():
        def scaled(x, idx=idx):
            x = x.clone()
            for p in positions:
                x[:, p, idx] *= factor
            return x

        mlp = model.transformer.h[layer].mlp
        handles.append(mlp.c_fc.register_forward_hook(lambda _m, _a, out, f=scaled: f(out)) if pre_activation
                       else mlp.c_proj.register_forward_pre_hook(lambda _m, args, f=scaled: (f(args[0]),)))
    try:
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    finally:
        for h in handles:
            h.remove()
    return float(sum(lp[p, t] for p, t in zip(positions, ids[len(p_ids):], strict=True)).exp())


def test_fact_rows_match_raw_recomputation(gpt2):
    neurons = [[0, 3], [1, 7], [1, 9]]
    record = evaluate_fact(gpt2, FACTS[0], FACTS, SearchConfig(seed=1), neurons=neurons)
    assert record["neurons"] == neurons and record["unrelated_uuid"] == "l-fr"
    assert sorted(layer for layer, _ in record["random_neurons"]) == [0, 1, 1]
    rows = pd.DataFrame(record["rows"])
    assert len(rows) == 2 * (2 + 1 + 2)  # interventions x (related + unrelated + random related prompts)
    model, tok = gpt2.model, gpt2.tokenizer
    for row in rows.itertuples():
        used = neurons if row.neurons == "refined" else record["random_neurons"]
        by_layer: dict[int, list[int]] = {}
        for layer, i in used:
            by_layer.setdefault(layer, []).append(i)
        factor = 0.0 if row.intervention == "suppress" else 2.0
        before = raw_prob(model, tok, row.prompt, row.answer)
        after = raw_prob(model, tok, row.prompt, row.answer, by_layer, factor)
        assert row.before == pytest.approx(before, rel=1e-4)
        assert row.after == pytest.approx(after, rel=1e-4)
        assert row.change_pct == pytest.approx(100 * (row.after - row.before) / row.before)
    assert set(rows["uuid"]) == {"c-fr"}


def test_kn_package_convention_edits_the_pre_activation_in_the_evaluation(gpt2):
    neurons = [[0, 3], [1, 7]]
    config = SearchConfig(seed=1, convention="kn-package", random_baseline=False)
    rows = pd.DataFrame(evaluate_fact(gpt2, FACTS[0], FACTS, config, neurons=neurons)["rows"])
    model, tok = gpt2.model, gpt2.tokenizer
    enhance = rows[rows.intervention == "enhance"]
    assert len(enhance) == 3
    for row in enhance.itertuples():
        want = raw_prob(model, tok, row.prompt, row.answer, {0: [3], 1: [7]}, 2.0, pre_activation=True)
        assert row.after == pytest.approx(want, rel=1e-4)
        paper = raw_prob(model, tok, row.prompt, row.answer, {0: [3], 1: [7]}, 2.0)
        assert abs(want - paper) > 1e-4 * want  # the two conventions differ on this model


def test_summary_means_per_fact_then_over_facts():
    def row(uuid, relation, n, change, prompts="related", neurons="refined", intervention="suppress"):
        return {"uuid": uuid, "relation": relation, "intervention": intervention, "prompts": prompts,
                "neurons": neurons, "n_neurons": n, "prompt": "p", "answer": "a", "before": 1.0, "after": 1.0,
                "change_pct": change}

    records = [
        {"uuid": "a", "relation": "r1", "neurons": [[0, 1]],
         "rows": [row("a", "r1", 1, -10.0), row("a", "r1", 1, -30.0),
                  row("a", "r1", 1, 4.0, neurons="random")]},
        {"uuid": "b", "relation": "r1", "neurons": [[0, 1], [0, 2]],
         "rows": [row("b", "r1", 2, -60.0), row("b", "r1", 2, 1.0, "unrelated")]},
        {"uuid": "c", "relation": "r2", "neurons": [],
         "rows": [row("c", "r2", 0, 0.0)]},  # no neurons: not averaged
        {"uuid": "d", "relation": "r2", "neurons": [[1, 1]],
         "rows": [row("d", "r2", 1, 50.0, intervention="enhance"), row("d", "r2", 1, math.nan)]},
    ]
    from fflayers.neurons.evaluate import results_table

    table = summary_table(results_table(records))
    get = table.set_index(["relation", "intervention", "prompts", "neurons"])
    assert get.loc[("r1", "suppress", "related", "refined"), "change_pct"] == pytest.approx(
        (-20.0 - 60.0) / 2)
    assert get.loc[("r1", "suppress", "related", "refined"), "n_facts"] == 2
    assert get.loc[("all", "suppress", "related", "refined"), "change_pct"] == pytest.approx(
        (-20.0 - 60.0) / 2)
    assert get.loc[("all", "enhance", "related", "refined"), "change_pct"] == pytest.approx(50.0)
    summary = summarize(records)
    assert summary["r1"]["suppress"] == {"related": -40.0, "unrelated": 1.0, "random_related": 4.0}
    assert summary["r2"]["n_facts"] == 2 and summary["r2"]["n_facts_with_neurons"] == 1
    assert summary["r1"]["mean_neurons"] == 1.5 and summary["all"]["n_facts"] == 4


def test_layer_restricted_search_agrees_with_the_class(gpt2):
    cfg = SearchConfig(steps=3, batch_size=16, p=0.4, coarse_adaptive_threshold=0.2)
    full = find_neurons(gpt2, FACTS[0], cfg)
    assert full
    every = SearchConfig(**{**cfg.to_json(), "layers": (0, 1)})
    assert find_neurons(gpt2, FACTS[0], every) == full
    only = find_neurons(gpt2, FACTS[0], SearchConfig(**{**cfg.to_json(), "layers": (1,)}))
    assert only and all(layer == 1 for layer, _ in only)


@pytest.mark.real_model
def test_smollm2_refined_neurons_beat_random_ones(smollm2):
    """Suppressing the refined neurons of country -> capital facts lowers the capital's probability more than
    suppressing as many random neurons of the same layers (last 4 layers searched, 2 IG steps, 2 prompts)."""
    facts = {f.uuid: f
             for f in countries_paraphrases({"capital": ["The capital of {} is", "{}'s capital city is"]})}
    chosen = [facts[u] for u in ("capital-FRA", "capital-JPN")]
    pool = chosen + load_relations(["official_language"])  # unrelated prompts of another relation
    cfg = SearchConfig(steps=2, batch_size=8, p=0.4, coarse_adaptive_threshold=0.2,
                       layers=tuple(range(smollm2.n_layers - 4, smollm2.n_layers)))
    records = [evaluate_fact(smollm2, f, pool, cfg) for f in chosen]
    assert all(r["unrelated_relation"] == "official_language" for r in records)
    summary = summarize(records)["all"]["suppress"]
    print("SmolLM2 suppress % change:", summary)
    assert all(r["neurons"] for r in records)
    assert summary["related"] < summary["random_related"] - 10
