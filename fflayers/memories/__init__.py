"""FF layers as key-value memories: trigger examples of keys (streaming top-k), their textual form,
FFN info (layer / dim modes) and key-value agreement (``fflayers.memories.ffn_info``,
``fflayers.memories.agreement``)."""

from fflayers.memories.textual import read_textual_dir, write_textual
from fflayers.memories.topk import StreamingTopK, all_gather_merge, merge_topk
from fflayers.memories.trigger_examples import TriggerExamples, trigger_examples

__all__ = [
    "StreamingTopK",
    "TriggerExamples",
    "all_gather_merge",
    "merge_topk",
    "read_textual_dir",
    "trigger_examples",
    "write_textual",
]
