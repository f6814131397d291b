"""Targets: teacher-forced causal answers, one [MASK] per wordpiece, no silent [UNK], bad prompts."""

from __future__ import annotations

import pytest
import torch

from fflayers.backends.hf import HFAdapter, load_hf_lm
from fflayers.core import FflayersError
from fflayers.neurons import argmax_completion, encode_target, forward_log_probs, target_probability
from tests.fixtures.hf_models import tiny_model
from tests.neurons.helpers import bert_tokenizer


@pytest.fixture
def bert(tmp_path) -> HFAdapter:
    return HFAdapter(tiny_model("bert"), bert_tokenizer(tmp_path / "tok"), device="cpu")


@pytest.fixture
def gpt2_bpe(tiny_gpt2_dir) -> HFAdapter:
    return load_hf_lm(str(tiny_gpt2_dir), device="cpu")


def test_causal_text_is_teacher_forced(gpt2_bpe):
    tok = gpt2_bpe.tokenizer
    t = encode_target(gpt2_bpe, "The capital of France is", "Kathmandu")
    prompt = tok("The capital of France is")["input_ids"]
    answer = tok(" Kathmandu")["input_ids"]
    assert len(answer) > 1
    assert t.ids[0].tolist() == prompt + answer[:-1]
    assert t.target_ids == answer
    assert t.positions == [len(prompt) - 1 + i for i in range(len(answer))]


def test_causal_probability_is_the_product_over_tokens(gpt2_bpe):
    t = encode_target(gpt2_bpe, "The capital of France is ", "Kathmandu")  # trailing space is not doubled
    lp = forward_log_probs(gpt2_bpe, t)
    model = gpt2_bpe.model
    full = torch.tensor([gpt2_bpe.tokenizer("The capital of France is Kathmandu")["input_ids"]])
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=full).logits.float(), -1)[0]
    n_prompt = t.positions[0] + 1
    want = sum(float(ref[n_prompt - 1 + i, full[0, n_prompt + i]]) for i in range(len(t.target_ids)))
    assert target_probability(gpt2_bpe, lp, t) == pytest.approx(float(torch.tensor(want).exp()), rel=1e-4)
    text, prob = argmax_completion(gpt2_bpe, lp, t)
    greedy = ref[torch.tensor(t.positions)].argmax(-1)
    assert text == gpt2_bpe.tokenizer.decode(greedy.tolist())
    assert prob == pytest.approx(float(ref[torch.tensor(t.positions), greedy].sum().exp()), rel=1e-4)


def test_mask_is_widened_per_wordpiece(bert):
    tok = bert.tokenizer
    t = encode_target(bert, "the capital of [MASK] is paris .", "london")
    ids = tok("the capital of [MASK] [MASK] is paris .")["input_ids"]
    assert t.ids[0].tolist() == ids
    assert t.positions == [4, 5]
    assert t.target_ids == tok.convert_tokens_to_ids(["lon", "##don"])
    # as many masks as pieces: used as given
    assert encode_target(bert, "the capital of [MASK] [MASK] is paris .", "london").positions == [4, 5]
    # an uncased tokenizer may lowercase the answer
    assert encode_target(bert, "[MASK] is the capital of france", "Paris").target_ids == [
        tok.convert_tokens_to_ids("paris")]


def test_masked_probability_reads_each_mask(bert):
    t = encode_target(bert, "the capital of [MASK] is paris .", "london")
    with torch.no_grad():
        ref = torch.log_softmax(bert.model(input_ids=t.ids).logits.float(), -1)[0]
    want = float(ref[4, t.target_ids[0]] + ref[5, t.target_ids[1]])
    lp = forward_log_probs(bert, t)
    assert target_probability(bert, lp, t) == pytest.approx(float(torch.tensor(want).exp()), rel=1e-4)


@pytest.mark.parametrize("prompt, answer, message", [
    ("the capital of france is paris", "paris", r"has no \[MASK\]"),
    ("[MASK] [MASK] is the capital of france", "paris", r"2 \[MASK\] tokens"),
    ("[MASK] [MASK] [MASK] is the capital", "london", r"3 \[MASK\] tokens"),
    ("[MASK] is the capital of france", "madrid", "cannot represent"),
    ("[MASK] is the capital of france", "  ", "cannot represent|no tokens"),
])
def test_bad_bert_input(bert, prompt, answer, message):
    with pytest.raises(FflayersError, match=message) as err:
        encode_target(bert, prompt, answer)
    assert "\n" not in str(err.value)


def test_unknown_word_is_an_error_not_unk(fairseq_adapters):
    adapter = fairseq_adapters("fairseq_plain_lm")
    with pytest.raises(FflayersError, match="cannot represent ground truth 'Zanzibar'"):
        encode_target(adapter, "Paris is the capital of the", "Zanzibar")
    t = encode_target(adapter, "Paris is the capital of the", "old city")
    assert adapter.vocab.id_to_token(t.target_ids) == ["old", "city"]


def test_bad_causal_input():
    adapter = HFAdapter(tiny_model("gpt2"), device="cpu")
    with pytest.raises(FflayersError, match="both as text or both as token ids"):
        encode_target(adapter, [1, 2], "x")
    with pytest.raises(FflayersError, match="outside the vocabulary"):
        encode_target(adapter, [1, 2], [500])
    with pytest.raises(FflayersError, match="prompt has no tokens"):
        encode_target(adapter, [], [3])
    with pytest.raises(FflayersError, match="ground truth has no tokens"):
        encode_target(adapter, [1], [])
