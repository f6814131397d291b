"""FF layers as key-value memories: trigger examples of keys (streaming top-k), their textual form, value
predictions, key-value agreement and FFN info (layer / dim modes)."""

from fflayers.memories.agreement import (
    agreement_by_layer,
    key_value_agreement,
    max_probs_by_layer,
    targets_from_examples,
)
from fflayers.memories.ffn_info import extract_ffn_info, ffn_info_by_layer
from fflayers.memories.textual import read_textual_dir, write_textual
from fflayers.memories.topk import StreamingTopK, all_gather_merge, merge_topk
from fflayers.memories.trigger_examples import TriggerExamples, trigger_examples
from fflayers.memories.value_projections import random_baseline, value_predictions

__all__ = [
    "StreamingTopK",
    "TriggerExamples",
    "agreement_by_layer",
    "all_gather_merge",
    "extract_ffn_info",
    "ffn_info_by_layer",
    "key_value_agreement",
    "max_probs_by_layer",
    "merge_topk",
    "random_baseline",
    "read_textual_dir",
    "targets_from_examples",
    "trigger_examples",
    "value_predictions",
    "write_textual",
]
