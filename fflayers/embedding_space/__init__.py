"""Parameters in embedding space: FF keys and values, attention W_QK / W_VO projected to the vocabulary."""

from fflayers.embedding_space.pairs import PairFilter, top_pairs
from fflayers.embedding_space.projections import (
    PAIR_COLUMNS,
    TOKEN_COLUMNS,
    head_matrix,
    head_pairs,
    iter_neuron_tokens,
    neuron_tokens,
)
from fflayers.embedding_space.vocabulary import (
    Embedding,
    case_space_groups,
    corpus_token_mask,
    embedding_matrix,
    token_mask,
)

__all__ = [
    "PAIR_COLUMNS",
    "TOKEN_COLUMNS",
    "Embedding",
    "PairFilter",
    "case_space_groups",
    "corpus_token_mask",
    "embedding_matrix",
    "head_matrix",
    "head_pairs",
    "iter_neuron_tokens",
    "neuron_tokens",
    "token_mask",
    "top_pairs",
]
