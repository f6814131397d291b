"""Dissecting factual recall (Geva et al., 2023): facts, attention knockout, projections, extraction,
enrichment.

Facts are ROME's known_1000 records (:mod:`fflayers.recall.facts`); :func:`encode_facts` turns them into the
token ids a model reads, with the subject's positions and the attribute's tokens; :func:`fact_batches` pads
them into batches in input order.
"""

from fflayers.recall.batching import FactBatch, fact_batches, make_fact_batch
from fflayers.recall.enrichment import (
    AttributeScorer,
    attributes_rate,
    attributes_rate_summary,
    read_paragraphs,
)
from fflayers.recall.extraction import (
    EXTRACTION_VARIANTS,
    extraction_events,
    extraction_overview,
    extraction_rates,
)
from fflayers.recall.facts import (
    EncodedFact,
    KnownFact,
    countries_facts,
    encode_fact,
    encode_facts,
    load_facts,
    save_facts,
    subject_span,
)
from fflayers.recall.knockout import (
    DEFAULT_SETS,
    KNOCKOUT_SETS,
    attention_knockout,
    knockout_position_sets,
    knockout_summary,
    layer_window,
)
from fflayers.recall.known import filter_facts, top1_predictions
from fflayers.recall.projection import POSITION_NAMES, position_index, project_topk, vocabulary_projections
from fflayers.recall.sublayer_knockout import KNOCKOUT_KINDS, sublayer_knockout, sublayer_knockout_summary

__all__ = [
    # projections, extraction, enrichment, sublayer knockout
    "POSITION_NAMES",
    "position_index",
    "project_topk",
    "vocabulary_projections",
    "EXTRACTION_VARIANTS",
    "extraction_events",
    "extraction_overview",
    "extraction_rates",
    "AttributeScorer",
    "attributes_rate",
    "attributes_rate_summary",
    "read_paragraphs",
    "KNOCKOUT_KINDS",
    "sublayer_knockout",
    "sublayer_knockout_summary",
    # facts and attention knockout
    "DEFAULT_SETS",
    "KNOCKOUT_SETS",
    "EncodedFact",
    "KnownFact",
    "FactBatch",
    "attention_knockout",
    "countries_facts",
    "encode_fact",
    "encode_facts",
    "fact_batches",
    "filter_facts",
    "knockout_position_sets",
    "knockout_summary",
    "layer_window",
    "load_facts",
    "make_fact_batch",
    "save_facts",
    "subject_span",
    "top1_predictions",
]
