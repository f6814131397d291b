"""A Llama-style tokenizer built offline (shared with other tests), and the slow-tokenizer offsets error.

The offsets contract of every backend is checked in test_contract.py."""

from __future__ import annotations

import pytest
import transformers as tf

from fflayers.backends.hf import HFAdapter
from fflayers.core import ModelError
from tests.fixtures.hf_models import tiny_model


def sentencepiece_style_tokenizer() -> tf.PreTrainedTokenizerFast:
    """A Llama-style tokenizer built offline: BPE over Metaspace (``▁``) pre-tokens, BOS ``<s>``
    prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = ["The capital of France is Paris", "Tim Cook is the CEO of Apple", "The company run by Tim Cook",
              "Germany Berlin Italy Rome", "The Eiffel Tower is in Paris"] * 20
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>", pad_token="</s>")


class SlowTokenizer:
    """Stands for a Python (slow) tokenizer: no offset mapping."""

    is_fast = False


def test_slow_tokenizer_is_a_one_line_error():
    """Character offsets need a fast tokenizer: a slow one is refused with a message saying so."""
    adapter = HFAdapter(tiny_model("gpt2"), SlowTokenizer(), device="cpu")
    with pytest.raises(ModelError, match="fast tokenizer"):
        adapter.vocab.tokenize_with_offsets("The capital")
