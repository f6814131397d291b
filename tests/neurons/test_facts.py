"""Fact files: round trip, one-line errors, and the countries paraphrase set built from a hand-made list."""

from __future__ import annotations

import gzip
import json

import pytest

from fflayers.core import FflayersError
from fflayers.neurons.facts import ParaphraseFact, countries_paraphrases, read_facts, write_facts

COUNTRIES = """# UN Code number: 2 letter ISO abbrev : 3 letter ISO abbrev : name : capital
250:FR:FRA:France:Paris
276:DE:DEU:Germany:Berlin
068:BO:BOL:Bolivia:La Paz (seat of government), Sucre (legal capital)
010:AQ:ATA:Antarctica:
392:JP:JPN:Japan:Tokyo
"""


@pytest.fixture
def countries_file(tmp_path):
    path = tmp_path / "countries.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(COUNTRIES)
    return path


def test_round_trip(tmp_path):
    facts = [ParaphraseFact("a", "capital", ("The capital of France is", "France's capital is"), "Paris"),
             ParaphraseFact("b", "lang", ("They speak",), "French")]
    path = tmp_path / "facts.jsonl"
    write_facts(path, facts)
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"uuid": "a", "relation": "capital",
                                    "prompts": ["The capital of France is", "France's capital is"],
                                    "answer": "Paris"}
    assert read_facts(path) == facts


@pytest.mark.parametrize("content,words", [
    ("", "holds no facts"),
    ("\n\n", "holds no facts"),
    ('{"uuid": "a", "relation": "r", "prompts": ["p"]}\n', "missing field"),
    ('{"uuid": "a", "relation": "r", "prompts": "p", "answer": "x"}\n', "non-empty list"),
    ('{"uuid": "a", "relation": "r", "prompts": [], "answer": "x"}\n', "non-empty list"),
    ('{"uuid": "a", "relation": "r", "prompts": ["p", ""], "answer": "x"}\n', "non-empty string"),
    ('{"uuid": "a", "relation": "r", "prompts": ["p"], "answer": ""}\n', "answer"),
    ('{"uuid": "a", "relation": "r", "prompts": ["p"], "answer": "x"}\nnot json\n', ":2: not valid JSON"),
    ('[1, 2]\n', "JSON object"),
    ('{"uuid": "a", "relation": "r", "prompts": ["p"], "answer": "x"}\n' * 2, "appears twice"),
])
def test_bad_files_are_one_line_errors(tmp_path, content, words):
    path = tmp_path / "facts.jsonl"
    path.write_text(content)
    with pytest.raises(FflayersError, match=words) as err:
        read_facts(path)
    assert "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(FflayersError, match="does not exist"):
        read_facts(tmp_path / "nope.jsonl")


def test_countries_paraphrases(countries_file):
    facts = countries_paraphrases(countries_file=countries_file)
    by_id = {f.uuid: f for f in facts}
    # Bolivia (notes in its capital) and Antarctica (no capital) are skipped
    assert sorted(by_id) == ["capital-DEU", "capital-FRA", "capital-JPN", "country_of_capital-DEU",
                             "country_of_capital-FRA", "country_of_capital-JPN"]
    france = by_id["capital-FRA"]
    assert france.relation == "capital" and france.answer == "Paris"
    assert "The capital of France is" in france.prompts and "France's capital city is" in france.prompts
    assert len(france.prompts) >= 3 and len(set(france.prompts)) == len(france.prompts)
    back = by_id["country_of_capital-JPN"]
    assert back.answer == "Japan" and "Tokyo is the capital of" in back.prompts


def test_countries_options(countries_file):
    facts = countries_paraphrases({"capital": ["Capital of {}:"]}, countries_file=countries_file, limit=2,
                                  mask_token="[MASK]")
    assert [(f.uuid, f.prompts, f.answer) for f in facts] == [
        ("capital-FRA", ("Capital of France: [MASK].",), "Paris"),
        ("capital-DEU", ("Capital of Germany: [MASK].",), "Berlin"),
    ]
    with pytest.raises(FflayersError, match="unknown relation"):
        countries_paraphrases({"population": ["{} has"]}, countries_file=countries_file)
    with pytest.raises(FflayersError, match="exactly one"):
        countries_paraphrases({"capital": ["no slot"]}, countries_file=countries_file)


def test_real_countries_list_has_both_relations():
    facts = countries_paraphrases()
    relations = {f.relation for f in facts}
    assert relations == {"capital", "country_of_capital"}
    assert any(f.uuid == "capital-FRA" and f.answer == "Paris" for f in facts)
