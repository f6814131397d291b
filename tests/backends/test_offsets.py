"""tokenize_with_offsets: the ids of tokenize() and each token's character span, for every backend."""

from __future__ import annotations

import pytest
import transformers as tf

from fflayers.backends.base import AdapterError
from fflayers.backends.hf import HFAdapter
from tests.fixtures.hf_models import tiny_model

TEXTS = ["The capital of France is", "Tim Cook is the CEO of", "  spaced   words here", "Hello, world! 1,200 km"]


def sentencepiece_style_tokenizer() -> tf.PreTrainedTokenizerFast:
    """A Llama-style tokenizer built offline: BPE over Metaspace (``▁``) pre-tokens, BOS ``<s>`` prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = ["The capital of France is Paris", "Tim Cook is the CEO of Apple", "The company run by Tim Cook",
              "Germany Berlin Italy Rome", "The Eiffel Tower is in Paris"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                      pad_token="</s>")


def gpt2_adapter(tiny_gpt2_dir) -> HFAdapter:
    return HFAdapter(tiny_model("gpt2"), tf.GPT2TokenizerFast.from_pretrained(tiny_gpt2_dir), device="cpu")


@pytest.mark.parametrize("text", TEXTS)
def test_gpt2_bpe_offsets_cover_each_token_text(text, tiny_gpt2_dir):
    adapter = gpt2_adapter(tiny_gpt2_dir)
    ids, spans = adapter.tokenize_with_offsets(text)
    assert ids == adapter.tokenize(text)
    for i, (a, b) in zip(ids, spans, strict=True):
        # byte-level BPE: the token's text is the span, possibly with the space before it
        assert adapter.id_to_token([i])[0].strip() == text[a:b].strip()


def test_sentencepiece_style_offsets_and_bos():
    tok = sentencepiece_style_tokenizer()
    adapter = HFAdapter(tiny_model("llama"), tok, device="cpu")
    ids, spans = adapter.tokenize_with_offsets("The capital of France is")
    assert ids == adapter.tokenize("The capital of France is")
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "▁The", "▁capital", "▁of", "▁France", "▁is"]
    assert spans == [(0, 0), (0, 3), (3, 11), (11, 14), (14, 21), (21, 24)]
    ids, spans = adapter.tokenize_with_offsets("The capital of France is", add_bos=False)
    assert ids[0] != tok.bos_token_id and spans[0] == (0, 3)


def test_fairseq_offsets_are_word_spans_after_eos(fairseq_adapters):
    adapter = fairseq_adapters("fairseq_plain_lm")
    text = "  The king of  Paris was"
    ids, spans = adapter.tokenize_with_offsets(text)
    assert ids == adapter.tokenize(text)
    assert ids[0] == adapter.bos_id and spans[0] == (0, 0)
    assert spans[1:] == [(2, 5), (6, 10), (11, 13), (15, 20), (21, 24)]
    assert adapter.tokenize_with_offsets(text, add_bos=False) == (ids[1:], spans[1:])


class SlowTokenizer:
    """Stands for a Python (slow) tokenizer: no offset mapping."""

    is_fast = False


def test_slow_tokenizer_is_a_one_line_error():
    adapter = HFAdapter(tiny_model("gpt2"), SlowTokenizer(), device="cpu")
    with pytest.raises(AdapterError, match="fast tokenizer"):
        adapter.tokenize_with_offsets("The capital")
