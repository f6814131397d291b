"""Attributes rate: the token filter on hand-made lists, paragraph matching, and the whole measure against an
independent recomputation on a tiny GPT-2 with the real BPE vocabulary."""

from __future__ import annotations

import math

import pytest
import torch

from fflayers.recall.enrichment import (
    AttributeScorer,
    attributes_rate,
    attributes_rate_summary,
    bare_token,
    candidate_tokens,
    mentions,
)
from fflayers.recall.facts import KnownFact, encode_facts

STOP = {"the", "and", "of", "with", "about", "between", "from", "into"}  # all in sklearn's list


def test_filter_drops_stopwords_and_short_tokens_and_cuts():
    tokens = ["Ġthe", " Paris", "an", "Ġé", " France", "▁wine", "to", "ĠAbout", " ok", "Ġabc",
              " cheese", "\u2581x"]
    assert candidate_tokens(tokens, keep=50) == [1, 4, 5, 9, 10]
    assert candidate_tokens(tokens, keep=3) == [1, 4, 5]
    assert candidate_tokens(tokens, keep=1) == [1]
    assert bare_token("ĠParis") == bare_token(" paris ") == bare_token("▁PARIS") == "paris"
    # 60 candidates, 10 stopwords among them: the top-50 cut keeps 50 in rank order
    many = [f" word{i}" if i % 6 else " between" for i in range(60)]
    kept = candidate_tokens(many, keep=50)
    assert len(kept) == 50 and all(i % 6 for i in kept) and kept == sorted(kept)


def test_mentions_whole_words_case_sensitive():
    assert mentions("Wine from France, and cheese.", "France")
    assert mentions("A France-based firm", "France")
    assert not mentions("Frances was there", "France")
    assert not mentions("in france", "France")
    assert mentions("The Czech Republic is", "Czech Republic")
    assert not mentions("SuperFrance", "France")


def independent_rate(model, tok, ids, pos, layer, paragraphs, subject, top=500, keep=50):
    """Everything by hand: plain hooks, ln_f + lm_head, decode, filter, substring match, set of paragraph
    tokens."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    seen = {}
    h = model.transformer.h[layer].register_forward_hook(
        lambda m, a, out: seen.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(torch.tensor([ids]))
        h.remove()
        vec = seen["h"][0, pos] if layer >= 0 else model.transformer.wte.weight[ids[pos]]
        logits = model.lm_head(model.transformer.ln_f(vec))
    order = logits.topk(top).indices.tolist()
    kept = []
    for i in order:
        text = tok.decode([i]).strip().lower()
        if len(text) > 2 and text not in ENGLISH_STOP_WORDS:
            kept.append(text)
        if len(kept) == keep:
            break
    about = [p for p in paragraphs if subject in p]
    words = {tok.decode([i]).strip().lower() for p in about for i in tok(p)["input_ids"]}
    return (sum(k in words for k in kept) / len(kept)) if about else math.nan, kept


def test_attributes_rate_equals_independent_recomputation(tiny_gpt2_dir):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from fflayers.backends.hf import load_hf_lm

    adapter = load_hf_lm(str(tiny_gpt2_dir), device="cpu")
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    facts = [KnownFact(0, "Norway", "Oslo", "The capital of Norway is"),
             KnownFact(1, "New Zealand", "Wellington", "New Zealand has its capital in"),
             KnownFact(2, "Peru", "Lima", "The capital city of Peru is")]
    encoded, skipped = encode_facts(adapter, facts)
    assert not skipped
    # plant: the Norway paragraph holds half of the words its layer-0 state keeps; Peru has no paragraph
    e0 = encoded[0]
    _, kept0 = independent_rate(model, tok, e0.ids, e0.subject_positions[-1], 0, [], "Norway")
    paragraphs = ["Norway is cold. " + " ".join(kept0[::2]), "New Zealand and Norway play rugby and chess.",
                  "Nothing about anyone here."]
    table = attributes_rate(adapter, encoded, paragraphs, positions=["subject_last", "last"], batch_size=2)
    assert len(table) == 3 * 2 * (1 + 2)  # facts x positions x (embedding + 2 layers)
    for e in encoded:
        for pos_name, pos in (("subject_last", e.subject_positions[-1]), ("last", e.last)):
            for layer in (-1, 0, 1):
                expected, kept = independent_rate(model, tok, e.ids, pos, layer, paragraphs, e.fact.subject)
                row = table[(table.known_id == e.fact.known_id) & (table.layer == layer)
                            & (table.position == pos_name)].iloc[0]
                assert row.source == ("embedding" if layer == -1 else "resid_post")
                assert row.n_kept == len(kept) == 50
                if math.isnan(expected):
                    assert math.isnan(row.rate) and row.n_paragraphs == 0
                else:
                    assert row.rate == pytest.approx(expected), (e.fact.subject, pos_name, layer)
    norway = table[(table.known_id == 0) & (table.layer == 0) & (table.position == "subject_last")].iloc[0]
    assert norway.n_paragraphs == 2 and norway.rate > 0.3  # planted (retokenized words match in part)
    summary = attributes_rate_summary(table)
    assert set(summary.n_facts) == {2}  # Peru has no paragraph


def test_scorer_needs_paragraph_lookup(tiny_gpt2_dir):
    from fflayers.backends.hf import load_hf_lm
    from fflayers.core import FflayersError

    adapter = load_hf_lm(str(tiny_gpt2_dir), device="cpu")
    scorer = AttributeScorer(adapter, top=20, keep=5)
    with pytest.raises(FflayersError, match="no paragraphs were looked up for subject 'Chad'"):
        scorer.rates(torch.randn(1, adapter.d_model), ["Chad"])
