"""Partial results of job-array scans (``--shard I/N``) and the final output files they merge into.

Job ``I`` of ``N`` writes ``OUTPUT.shard-I-of-N.pt`` (:mod:`fflayers.runs.partials`): the run's header, its
merged partial state (a top-k state or a table) and, for trigger examples, the texts of the sentences its
top-k refers to (``extra["texts"]``) and the name of this module (``header["module"]``, which
``fflayers merge`` imports). Importing it registers the merges of the two scans (``trigger_examples``,
``ffn_info``) and the writer of their merged output (:func:`write_merged`: the same file a single run
writes, :func:`write_scan_output`); :func:`merge_partials` merges a run's partials with them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fflayers.runs import (
    PARTIAL_FORMAT,
    MergedPartials,
    find_partials,
    partial_path,
    read_partial,
    register_merge,
)
from fflayers.runs import merge_partials as merge_run_partials
from fflayers.runs import write_partial as write_run_partial

TABLE_SUFFIXES = (".parquet", ".pkl", ".pickle", ".tsv", ".csv")

__all__ = ["partial_path", "write_partial", "read_partial", "find_partials", "merge_partials",
           "write_scan_output", "write_merged", "referenced_texts", "merge_topk_states", "merge_tables",
           "PARTIAL_FORMAT", "TABLE_SUFFIXES", "MODULE"]

#: what a scan's partial names as its module (``header["module"]``)
MODULE = __name__


def referenced_texts(state: dict | None, texts: Sequence[str]) -> dict[int, str]:
    """Texts of the sentences a top-k state refers to."""
    if state is None:
        return {}
    ids = state["sentence_ids"].reshape(-1)
    return {int(i): texts[int(i)] for i in torch.unique(ids[ids >= 0]).tolist()}


def write_partial(path: str | os.PathLike, header: dict, state: Any,
                  texts: dict[int, str] | None = None) -> None:
    """A scan job's partial, with the texts its top-k refers to."""
    write_run_partial(path, header, state, {"texts": texts or {}})


def merge_topk_states(states: list[dict]) -> dict:
    """Top-k state dicts (trigger examples) merged into one."""
    from fflayers.memories.topk import StreamingTopK

    out = StreamingTopK.from_state_dict(states[0])
    for state in states[1:]:
        out.merge(StreamingTopK.from_state_dict(state))
    return out.state_dict()


def merge_tables(states: list[Any]) -> Any:
    """FFN-info row blocks concatenated, sorted by sentence then layer (the first block's ``attrs`` kept)."""
    import pandas as pd

    attrs = dict(states[0].attrs)
    df = pd.concat(states, ignore_index=True).sort_values(["sentence", "layer"], kind="stable")
    df = df.reset_index(drop=True)
    df.attrs.update(attrs)
    return df


def write_merged(output: Path, merged: MergedPartials) -> None:
    """The output file of a scan from the merge of its jobs' partials (refusing a suffix the jobs refuse)."""
    from fflayers.io import table_suffix

    table_suffix(output, "--output_file")
    header = merged.header
    write_scan_output(output, header["kind"], merged.state, header["config"], merged.extra.get("texts", {}))


register_merge("trigger_examples", merge_topk_states, write_merged)
register_merge("ffn_info", merge_tables, write_merged)


def merge_partials(paths: Sequence[str | os.PathLike]) -> tuple[dict, Any, dict[int, str]]:
    """``(header, merged state, texts)`` of the partials of one run; refuses mixed or incomplete sets."""
    merged = merge_run_partials(paths)
    return merged.header, merged.state, merged.extra.get("texts", {})


def write_scan_output(output: str | os.PathLike, kind: str, state: Any, config: dict,
                      texts: dict[int, str] | Sequence[str]) -> None:
    """The output file of ``generate_outputs.py``: trigger examples as JSONL (or a table by extension), FFN
    info as a table. ``state``: a top-k state dict (trigger examples) or the final table."""
    from fflayers.io import write_jsonl, write_table

    output = Path(output)
    if kind != "trigger_examples":
        write_table(output, state)
        return
    from fflayers.memories.trigger_examples import TriggerExamples

    n = int(config["n_sentences"])
    if isinstance(texts, dict):
        lookup = [""] * n
        for i, t in texts.items():
            lookup[int(i)] = t
        texts = lookup
    result = TriggerExamples(state["values"], state["sentence_ids"], state["positions"],
                             list(config["layers"]), list(config["dims"]), int(config["k"]), n)
    if output.suffix.lower() in TABLE_SUFFIXES:
        table = result.to_frame()
        table["text"] = [texts[i] for i in table["sentence_id"]]
        write_table(output, table)
    else:
        write_jsonl(output, result.to_jsonl_rows(texts))
