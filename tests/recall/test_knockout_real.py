"""SmolLM2 on country -> capital facts it gets right: blocking the edges from the last position to the subject
in upper layers hurts the prediction more than blocking them to the other non-first tokens (the paper's
finding)."""

from __future__ import annotations

import pytest

from fflayers.recall import attention_knockout, countries_facts, encode_facts, filter_facts

COUNTRIES = ("France", "Germany", "Italy", "Japan", "China", "Greece", "Austria", "Hungary",
             "Ireland", "Cuba")


@pytest.mark.real_model
def test_subject_knockout_hurts_more_than_non_subject_in_upper_layers(smollm2):
    facts = [f for f in countries_facts() if f.subject in COUNTRIES]
    encoded, skipped = encode_facts(smollm2, facts)
    assert not skipped
    known = filter_facts(smollm2, encoded)[:4]
    assert len(known) >= 4  # SmolLM2 knows these capitals
    table = attention_knockout(smollm2, known, layers=range(19, 28),
                               sets=["subject", "non_subject_excl_first"], window=9, batch_size=64)
    mean = table.groupby("set")["rel_change_pct"].mean()
    assert mean["subject"] < mean["non_subject_excl_first"] - 10
    assert mean["subject"] < -30
