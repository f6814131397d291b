"""Corpus readers, sentence splitting and length-bucketed batching."""

from fflayers.data.batching import Batch, iter_batches, make_batches, plan_batches
from fflayers.data.readers import (
    detect_format,
    is_wikitext_heading,
    read_corpus,
    read_jsonl_texts,
    read_text_lines,
    read_wikitext_lines,
)
from fflayers.data.sentences import (
    iter_sentences,
    shuffled_sentences,
    split_pretokenized_line,
    split_raw_text,
    split_sentences,
)
from fflayers.data.wikitext import detokenize_wikitext, model_sentences, text_for_model

__all__ = [
    "Batch",
    "detect_format",
    "detokenize_wikitext",
    "is_wikitext_heading",
    "iter_batches",
    "iter_sentences",
    "make_batches",
    "model_sentences",
    "plan_batches",
    "read_corpus",
    "read_jsonl_texts",
    "read_text_lines",
    "read_wikitext_lines",
    "shuffled_sentences",
    "split_pretokenized_line",
    "split_raw_text",
    "split_sentences",
    "text_for_model",
]
