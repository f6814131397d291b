"""Fact files, subject positions and attribute tokens (hand-checked for BPE, SentencePiece-style and
whitespace tokenizers), and the filter against the model's own top-1."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
import transformers as tf

from fflayers.backends.hf import HFAdapter
from fflayers.core import FflayersError
from fflayers.recall import (
    EncodedFact,
    KnownFact,
    countries_facts,
    encode_fact,
    encode_facts,
    filter_facts,
    load_facts,
    save_facts,
)
from tests.backends.test_offsets import sentencepiece_style_tokenizer
from tests.fixtures.hf_models import tiny_model


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir) -> HFAdapter:
    """A random 2-layer GPT-2 with the real GPT-2 BPE tokenizer."""
    model = tf.GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    return HFAdapter(model, tf.GPT2TokenizerFast.from_pretrained(tiny_gpt2_dir), device="cpu")


# ----- files -----------------------------------------------------------------------------------------------


RECORDS = [
    {"known_id": 0, "subject": "Vinson Massif", "attribute": "Antarctica",
     "template": "{} is located in the continent of",
     "prediction": " Antarctica", "prompt": "Vinson Massif is located in the continent of",
     "relation_id": "P30"},
    {"known_id": 1, "subject": "Beats Music", "attribute": "Apple", "prompt": "Beats Music is owned by"},
]


def test_save_and_load_keep_every_field(tmp_path):
    path = tmp_path / "known.json"
    path.write_text(json.dumps(RECORDS))
    facts = load_facts(path)
    assert [f.known_id for f in facts] == [0, 1]
    assert facts[0].extra == {"template": "{} is located in the continent of", "prediction": " Antarctica",
                              "relation_id": "P30"}
    save_facts(facts, tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == RECORDS


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("[{\"known_id\": 0,", "not valid JSON"),
    ("{\"known_id\": 0}", "expected a list"),
])
def test_bad_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(FflayersError, match=message) as err:
        load_facts(path)
    assert "\n" not in str(err.value)


def test_bad_entries_raise_or_are_skipped_by_name(tmp_path):
    records = [RECORDS[1], {"known_id": 7, "subject": "X", "prompt": "X is"}, 5,
               {"known_id": 8, "subject": "", "attribute": "a", "prompt": "p"}, RECORDS[1]]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))
    with pytest.raises(FflayersError, match="fact 7 has no field attribute"):
        load_facts(path)
    skipped: list[str] = []
    facts = load_facts(path, skipped=skipped)
    assert [f.known_id for f in facts] == [1]
    assert len(skipped) == 4
    assert ("fact 7" in skipped[0] and "fact #2" in skipped[1] and "fact 8" in skipped[2]
            and "twice" in skipped[3])


def test_countries_facts_from_a_planted_list(tmp_path):
    path = tmp_path / "countries.gz"
    with gzip.open(path, "wt") as f:
        f.write("# comment\n250:FR:FRA:France:Paris\n276:DE:DEU:Germany:Berlin\n010:AQ:ATA:Antarctica:\n")
    facts = countries_facts(path)
    assert [(f.known_id, f.subject, f.attribute, f.prompt) for f in facts] == [
        (0, "France", "Paris", "The capital of France is"),
        (1, "Germany", "Berlin", "The capital of Germany is")]


# ----- subject positions (hand-checked) --------------------------------------------------------------------

# prompt, subject, expected subject positions without BOS: start, middle, end, part of a word
CASES = [
    ("Tim Cook is the CEO of", "Tim Cook", [0, 1]),
    ("The capital of France is", "France", [3]),
    ("The company run by Tim Cook", "Tim Cook", [4, 5]),
]


def test_gpt2_bpe_subject_positions_and_attribute(gpt2):
    for prompt, subject, expected in CASES:
        enc = encode_fact(gpt2, KnownFact(0, subject, "Paris", prompt))
        assert enc.subject_positions == expected, prompt
    enc = encode_fact(gpt2, KnownFact(0, "France", "Paris", "The capital of France is"))
    # GPT-2's tokens: The | Ġcapital | Ġof | ĠFrance | Ġis ; " Paris" is entry 6342 of the real vocabulary
    assert gpt2.tokenizer.convert_ids_to_tokens(enc.ids) == ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
    assert enc.attribute_ids == [6342] and enc.attribute_id == 6342 and enc.attribute_split == "joint"
    assert enc.last == 4
    # a subject inside a word: every token touching it counts
    enc = encode_fact(gpt2, KnownFact(0, "Paris", "France", "Parisians live in"))
    toks = gpt2.tokenizer.convert_ids_to_tokens(enc.ids)
    assert toks[:2] == ["Paris", "ians"] and enc.subject_positions == [0]


def test_sentencepiece_style_subject_positions_shift_by_bos():
    adapter = HFAdapter(tiny_model("llama"), sentencepiece_style_tokenizer(), device="cpu")
    for prompt, subject, expected in CASES:
        enc = encode_fact(adapter, KnownFact(0, subject, "Paris", prompt))
        assert enc.ids[0] == adapter.tokenizer.bos_token_id
        assert enc.subject_positions == [p + 1 for p in expected], prompt
    enc = encode_fact(adapter, KnownFact(0, "France", "Paris", "The capital of France is"))
    assert adapter.tokenizer.convert_ids_to_tokens(enc.attribute_ids) == ["▁Paris"]


def test_whitespace_subject_positions_after_eos(fairseq_adapters):
    adapter = fairseq_adapters("fairseq_plain_lm")
    for prompt, subject, expected in CASES:
        enc = encode_fact(adapter, KnownFact(0, subject, "Paris", prompt))
        assert enc.ids[0] == adapter.vocab.bos_id
        assert enc.subject_positions == [p + 1 for p in expected], prompt
    enc = encode_fact(adapter, KnownFact(0, "the king", "built the city", "In 1900 the king"))
    assert enc.subject_positions == [3, 4]
    assert enc.attribute_ids == [adapter.dictionary.index(w) for w in ("built", "the", "city")]


def test_first_occurrence_of_a_repeated_subject(gpt2):
    enc = encode_fact(gpt2, KnownFact(0, "Paris", "France", "Paris and Paris are in"))
    assert enc.subject_positions == [0]


# ----- bad facts --------------------------------------------------------------------------------------------


def test_bad_facts_are_skipped_with_one_line_messages(gpt2):
    facts = [KnownFact(0, "France", "Paris", "The capital of France is"),
             KnownFact("q1", "Spain", "Madrid", "The capital of France is"),
             KnownFact(2, "France", "Paris", "The capital of France is" + " very" * 200)]
    encoded, skipped = encode_facts(gpt2, facts)
    assert [e.fact.known_id for e in encoded] == [0]
    assert "fact 'q1'" in skipped[0] and "'Spain' is not in the prompt" in skipped[0]
    assert "fact 2" in skipped[1] and "more than the model's 128 positions" in skipped[1]
    with pytest.raises(FflayersError, match="fact 'q1'"):
        encode_facts(gpt2, facts, skip_bad=False)


def test_masked_lm_is_rejected():
    adapter = HFAdapter(tiny_model("bert"), device="cpu")
    with pytest.raises(FflayersError, match="masked LM"):
        encode_fact(adapter, KnownFact(0, "a", "b", "a c"))


# ----- filter -----------------------------------------------------------------------------------------------


def test_filter_keeps_exactly_the_facts_whose_top1_is_the_attribute(gpt2):
    prompts = ["The capital of France is", "Tim Cook is the CEO of", "The Eiffel Tower is in the city of"]
    items = []
    for i, prompt in enumerate(prompts):
        ids = gpt2.vocab.tokenize(prompt)
        with torch.no_grad():  # the model's own top-1, straight from transformers
            top1 = int(gpt2.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        attribute = top1 if i != 1 else (top1 + 1) % gpt2.vocab_size  # plant one wrong attribute
        items.append(EncodedFact(KnownFact(i, prompt.split()[0], "x", prompt), ids, [0], [attribute, 5]))
    kept = filter_facts(gpt2, items, batch_size=2)
    assert [e.fact.known_id for e in kept] == [0, 2]
