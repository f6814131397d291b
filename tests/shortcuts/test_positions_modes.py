"""More than one position per sentence (``mode="all"``, ``per_sentence=N``): which positions, the inputs they
share, and states read from one shared forward pass against each position's own prefix."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fflayers.backends.hf import HFAdapter
from fflayers.core import InputError
from fflayers.shortcuts import collect_states, sample_positions
from fflayers.shortcuts.chains import iter_submodule_points
from tests.fixtures.hf_models import tiny_model
from tests.shortcuts.test_positions_states import MASK, random_sentences, reference_states, with_bos


@pytest.fixture(scope="module")
def adapters() -> dict[str, HFAdapter]:
    return {arch: HFAdapter(tiny_model(arch), device="cpu") for arch in ("gpt2", "llama", "bert")}


def own_prefix(p):
    """The same position with the paper's input: the prefix that ends at it."""
    return dataclasses.replace(p, input_ids=p.input_ids[: p.position + 1])


def test_all_positions_of_a_causal_lm_share_the_sentence(adapters):
    adapter = with_bos(adapters["llama"], 1)
    sentences = [[1, *s] for s in random_sentences(6, seed=2, lo=2, hi=9)]
    pos = sample_positions(adapter, sentences, mode="all")
    assert len(pos) == sum(len(s) - 1 for s in sentences)  # every token but the leading BOS
    for si, s in enumerate(sentences):
        mine = [p for p in pos if p.sentence_index == si]
        assert [p.position for p in mine] == list(range(1, len(s)))
        assert all(p.input_ids == tuple(s) and p.read_at == p.position for p in mine)


def test_per_sentence_draws_distinct_sorted_positions(adapters):
    adapter = adapters["gpt2"]
    sentences = random_sentences(40, seed=5, lo=2, hi=15)
    pos = sample_positions(adapter, sentences, seed=3, per_sentence=4)
    for si, s in enumerate(sentences):
        got = [p.position for p in pos if p.sentence_index == si]
        assert got == sorted(set(got)) and len(got) == min(4, len(s))
        assert all(p.input_ids == tuple(s[: got[-1] + 1]) for p in pos if p.sentence_index == si)
    # a numpy draw of the same seed: the positions are rng.choice without replacement, sentence by sentence
    rng = np.random.default_rng(3)
    want = []
    for s in sentences:
        want += list(range(len(s))) if len(s) <= 4 else sorted(rng.choice(len(s), 4, replace=False).tolist())
    assert [p.position for p in pos] == want
    # one per sentence stays the paper's protocol: the prefix that ends at the position
    one = sample_positions(adapter, sentences, seed=3, per_sentence=1)
    assert one == sample_positions(adapter, sentences, seed=3)
    assert all(p.input_ids == tuple(sentences[p.sentence_index][: p.position + 1]) for p in one)


def test_all_positions_of_a_masked_lm_mask_one_token_each(adapters):
    sentences = random_sentences(4, seed=1, frame=0)
    pos = sample_positions(adapters["bert"], sentences, mask_id=MASK, mode="all")
    assert len(pos) == sum(len(s) - 2 for s in sentences)  # not the frame tokens
    for p in pos:
        s = sentences[p.sentence_index]
        assert p.input_ids == tuple(MASK if k == p.position else t for k, t in enumerate(s))


def test_bad_modes(adapters):
    with pytest.raises(InputError, match="positions mode 'every' is unknown"):
        sample_positions(adapters["gpt2"], [[5, 6]], mode="every")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InputError, match="per_sentence"):
            sample_positions(adapters["gpt2"], [[5, 6]], per_sentence=bad)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_shared_states_equal_each_positions_own_forward(adapters, arch):
    """States read at many rows of one padded forward pass = ``output_hidden_states`` of each position's own
    input run alone (causal: the prefix that ends at it)."""
    adapter = adapters[arch]
    if arch == "bert":
        pos = sample_positions(adapter, random_sentences(5, seed=3, frame=0), mask_id=MASK, mode="all")
    else:
        pos = sample_positions(adapter, random_sentences(5, seed=3, lo=3, hi=14), mode="all")
    states = collect_states(adapter, pos, batch_size=7)
    assert states.shape[0] == len(pos) > 20
    for k, p in enumerate(pos):
        alone = p if arch == "bert" else own_prefix(p)
        torch.testing.assert_close(states[k], reference_states(adapter, alone), atol=1e-5, rtol=1e-5)


def test_shared_submodule_points_equal_prefix_points(adapters):
    adapter = adapters["llama"]
    pos = sample_positions(adapter, random_sentences(4, seed=8, lo=3, hi=12), seed=1, per_sentence=3)
    shared = list(iter_submodule_points(adapter, pos, batch_size=5))
    alone = list(iter_submodule_points(adapter, [own_prefix(p) for p in pos], batch_size=5))
    assert len(shared) == len(alone) == -(-len(pos) // 5)
    for a, b in zip(shared, alone, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)
