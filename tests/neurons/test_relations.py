"""The shipped multi-relation fact file (causal and masked forms), and unrelated facts drawn from another
relation, with the one-line warning when the facts hold a single relation; SmolLM2's accuracy on the file."""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from fflayers.core import FflayersError
from fflayers.neurons import evaluate as ev
from fflayers.neurons.evaluate import (
    SearchConfig,
    UnrelatedFallbackWarning,
    evaluate_facts,
    pick_unrelated,
    warn_unrelated_fallbacks,
)
from fflayers.neurons.facts import (
    MASK_PLACEHOLDER,
    RELATIONS_FILE,
    ParaphraseFact,
    load_relations,
    read_facts,
    relation_names,
)

REQUIRED = {"capital", "city_country", "official_language", "continent", "currency", "instrument",
            "company_country", "element_symbol"}


def rows() -> list[dict]:
    return [json.loads(line) for line in RELATIONS_FILE.read_text(encoding="utf-8").splitlines() if line]


def test_relations_file_ships_inside_the_package():
    import fflayers.data

    assert RELATIONS_FILE.is_file() and RELATIONS_FILE.parent == RELATIONS_FILE.parent.parent / "data"
    assert RELATIONS_FILE.parent.samefile(next(iter(fflayers.data.__path__)))


def test_relations_file_has_eight_relations_of_fifteen_facts():
    facts = load_relations()
    names = relation_names(facts)
    assert len(names) >= 8 and REQUIRED <= set(names)
    count = defaultdict(int)
    for f in facts:
        count[f.relation] += 1
    assert all(n >= 15 for n in count.values()), count
    assert len({f.uuid for f in facts}) == len(facts)
    for f in facts:
        assert isinstance(f.answer, str) and f.answer == f.answer.strip() and f.answer
        assert len(f.answer.split()) == 1, f.answer  # one word
        assert len(f.prompts) >= 3 and len(set(f.prompts)) == len(f.prompts)
        assert all(p == p.strip() and MASK_PLACEHOLDER not in p for p in f.prompts)


def test_every_fact_has_causal_and_masked_paraphrases():
    for row in rows():
        causal, masked = row["prompts"], row["masked_prompts"]
        assert len(causal) >= 3 and len(masked) == len(causal), row["uuid"]
        assert all(m.count(MASK_PLACEHOLDER) == 1 for m in masked), row["uuid"]
        assert len(set(masked)) == len(masked)
        assert not any(row["answer"] in p.split() for p in causal + masked), row["uuid"]  # answer not given


def test_masked_form_uses_the_models_mask_token():
    causal = load_relations()
    masked = load_relations(mask_token="<mask>")
    def key(f):
        return f.uuid, f.relation, f.answer

    assert [key(f) for f in masked] == [key(f) for f in causal]
    assert all(p.count("<mask>") == 1 and MASK_PLACEHOLDER not in p for f in masked for p in f.prompts)
    bert = {f.uuid: f for f in load_relations(mask_token="[MASK]")}
    assert bert["capital-france"].prompts[0] == "The capital of France is [MASK]."
    assert "The capital of France is" in {f.uuid: f for f in causal}["capital-france"].prompts


def test_relation_filter():
    facts = load_relations(["element_symbol", "currency"])
    assert set(relation_names(facts)) == {"element_symbol", "currency"}
    with pytest.raises(FflayersError, match="unknown relation.*nope; the facts hold capital") as err:
        load_relations(["nope"])
    assert "\n" not in str(err.value)


def test_masked_prompts_in_any_fact_file(tmp_path):
    path = tmp_path / "facts.jsonl"
    plain = {"uuid": "b", "relation": "r", "prompts": ["Paris is the capital of [MASK]."], "answer": "France"}
    path.write_text(json.dumps({"uuid": "a", "relation": "r", "prompts": ["The capital of France is"],
                                "masked_prompts": ["[MASK] is the capital of France."], "answer": "Paris"})
                    + "\n" + json.dumps(plain) + "\n")
    assert [f.prompts for f in read_facts(path)] == [("The capital of France is",), tuple(plain["prompts"])]
    assert [f.prompts for f in read_facts(path, mask_token="<mask>")] == [
        ("<mask> is the capital of France.",), tuple(plain["prompts"])]  # no masked form: prompts as given
    for masked, words in ((["no slot here"], "exactly once"), (["[MASK] [MASK]"], "exactly once"),
                          ([], "non-empty list"), ("[MASK]", "non-empty list")):
        path.write_text(json.dumps({**plain, "masked_prompts": masked}) + "\n")
        with pytest.raises(FflayersError, match=words) as err:
            read_facts(path)
        assert "\n" not in str(err.value) and ":1:" in str(err.value)


PLANTED = [
    ParaphraseFact("cap-fr", "capital", ("The capital of France is",), "Paris"),
    ParaphraseFact("cap-de", "capital", ("The capital of Germany is",), "Berlin"),
    ParaphraseFact("cap-jp", "capital", ("The capital of Japan is",), "Tokyo"),
    ParaphraseFact("lang-fr", "language", ("In France people speak",), "French"),
    ParaphraseFact("lang-de", "language", ("In Germany people speak",), "German"),
]


@pytest.fixture
def no_model(monkeypatch):
    """evaluate_facts without a model: one refined neuron a fact, rows recording which fact was measured."""
    monkeypatch.setattr(ev, "find_neurons", lambda adapter, fact, config: [[0, 1]])
    monkeypatch.setattr(ev, "measure", lambda adapter, fact, neurons, prompts, kind, owner, *_conv: [
        {"uuid": owner.uuid, "prompts": prompts, "neurons": kind, "measured": fact.uuid}])
    return SimpleNamespace(d_ff=8)


def test_unrelated_facts_come_from_another_relation():
    by_id = {f.uuid: f for f in PLANTED}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning when another relation exists
        for seed in range(10):
            for fact in PLANTED:
                other = pick_unrelated(PLANTED, fact, seed)
                assert other.relation != fact.relation and other.uuid in by_id
        assert warn_unrelated_fallbacks(PLANTED) is None
    picked = {pick_unrelated(PLANTED, PLANTED[0], seed).uuid for seed in range(30)}
    assert picked == {"lang-fr", "lang-de"}  # both facts of the other relation get drawn


def test_another_relation_with_another_answer_first():
    facts = [ParaphraseFact("city-osaka", "city_country", ("The city of Osaka is in",), "Japan"),
             ParaphraseFact("co-sony", "company_country", ("Sony comes from",), "Japan"),
             ParaphraseFact("co-fiat", "company_country", ("Fiat comes from",), "Italy")]
    assert all(pick_unrelated(facts, facts[0], seed).uuid == "co-fiat" for seed in range(10))
    assert pick_unrelated(facts[:2], facts[0]).uuid == "co-sony"  # same answer only: still another relation


def test_a_relation_with_one_fact_gets_another_relation(no_model):
    facts = PLANTED[:3] + PLANTED[3:4]  # language: a single fact
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        records = evaluate_facts(no_model, facts, SearchConfig(), progress=False)
    assert records[3]["unrelated_relation"] == "capital"
    assert all(r["unrelated_relation"] == "language" for r in records[:3])
    assert [r["unrelated_uuid"] for r in records[:3]] == ["lang-fr"] * 3


def test_evaluation_records_other_relation_facts(no_model):
    records = evaluate_facts(no_model, PLANTED, SearchConfig(seed=3), progress=False)
    for fact, record in zip(PLANTED, records, strict=True):
        unrelated = [r for r in record["rows"] if r["prompts"] == "unrelated"]
        assert unrelated and {r["measured"] for r in unrelated} == {record["unrelated_uuid"]}
        assert record["unrelated_relation"] != fact.relation
        assert {f.uuid: f for f in PLANTED}[record["unrelated_uuid"]].relation == record["unrelated_relation"]


def test_single_relation_falls_back_with_one_warning_line(no_model):
    capitals = PLANTED[:3]
    with pytest.warns(UnrelatedFallbackWarning) as caught:
        records = evaluate_facts(no_model, capitals, SearchConfig(), progress=False)
    assert len(caught) == 1  # one line for the evaluation, not one a fact
    text = str(caught[0].message)
    assert "\n" not in text and "another relation than 'capital'" in text
    for r in records:
        assert r["unrelated_relation"] == "capital" and r["unrelated_uuid"] not in (None, r["uuid"])
        assert f"{r['uuid']} -> {r['unrelated_uuid']}" in text  # names each fallback fact
    # the fact on its own: the warning names the relation, the fact and its fallback
    with pytest.warns(UnrelatedFallbackWarning, match="'capital'.*cap-fr come from cap-(de|jp)") as one:
        pick_unrelated(capitals, capitals[0])
    assert len(one) == 1 and "\n" not in str(one[0].message)


def test_single_fact_has_no_unrelated_prompts_and_says_so(no_model):
    with pytest.warns(UnrelatedFallbackWarning, match="'capital'.*cap-fr -> none") as caught:
        records = evaluate_facts(no_model, PLANTED[:1], SearchConfig(), progress=False)
    assert len(caught) == 1
    assert records[0]["unrelated_uuid"] is None and records[0]["unrelated_relation"] is None
    assert not [r for r in records[0]["rows"] if r["prompts"] == "unrelated"]
    with pytest.warns(UnrelatedFallbackWarning, match="another relation than 'capital'.*cap-fr has no"):
        assert pick_unrelated(PLANTED[:1], PLANTED[0]) is None


def greedy_hits(adapter, facts) -> dict[str, list[bool]]:
    """Per relation, for every causal prompt: is the greedy next token the first token of the answer?
    Prompts of equal token length run as one batch."""
    from fflayers.neurons.targets import encode_target

    items = []
    for f in facts:
        for prompt in f.prompts:
            target = encode_target(adapter, prompt, f.answer)
            prompt_ids = target.ids[0, : target.positions[0] + 1].tolist()
            items.append((f.relation, prompt_ids, target.target_ids[0]))
    by_length = defaultdict(list)
    for item in items:
        by_length[len(item[1])].append(item)
    hits = defaultdict(list)
    with torch.no_grad():
        for group in by_length.values():
            for start in range(0, len(group), 64):
                chunk = group[start : start + 64]
                ids = torch.tensor([ids for _, ids, _ in chunk], device=adapter.device)
                best = adapter.log_probs(ids)[:, -1].argmax(-1).tolist()
                for (relation, _, first), top in zip(chunk, best, strict=True):
                    hits[relation].append(top == first)
    return hits


@pytest.mark.real_model
def test_smollm2_answers_the_causal_prompts(smollm2):
    """SmolLM2-135M's greedy next token starts the answer for a fair share of the causal prompts (printed per
    relation); only the overall share is checked."""
    facts = load_relations()
    hits = greedy_hits(smollm2, facts)
    every = [h for v in hits.values() for h in v]
    for relation in relation_names(facts):
        v = hits[relation]
        print(f"SmolLM2 {relation:<18} {sum(v) / len(v):.2f} ({sum(v)}/{len(v)} prompts)")
    share = sum(every) / len(every)
    print(f"SmolLM2 overall            {share:.2f} ({sum(every)}/{len(every)} prompts)")
    assert share >= 0.30
