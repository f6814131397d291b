"""Partial results of job-array scans (``--shard I/N``) and the final output files they merge into.

Job ``I`` of ``N`` writes ``OUTPUT.shard-I-of-N.pt``: the run's config and its hash, which shards it covers,
its merged partial state (a top-k state or a table) and, for trigger examples, the texts of the sentences its
top-k refers to. :func:`merge_partials` checks that the ``N`` partials come from one configuration and cover
every shard exactly once, and merges them with the scan's own merge; :func:`write_scan_output` writes the same
file a single run writes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fflayers.backends.base import AdapterError
from fflayers.safe_pickle import UnsafePickleError, torch_load_restricted

PARTIAL_FORMAT = "fflayers-scan-partial/1"
TABLE_SUFFIXES = (".parquet", ".pkl", ".pickle", ".tsv", ".csv")

__all__ = ["partial_path", "write_partial", "read_partial", "find_partials", "merge_partials", "write_scan_output",
           "referenced_texts"]


def partial_path(output: str | os.PathLike, job: int, jobs: int) -> Path:
    return Path(f"{output}.shard-{job}-of-{jobs}.pt")


def referenced_texts(state: dict | None, texts: Sequence[str]) -> dict[int, str]:
    """Texts of the sentences a top-k state refers to."""
    if state is None:
        return {}
    ids = state["sentence_ids"].reshape(-1)
    return {int(i): texts[int(i)] for i in torch.unique(ids[ids >= 0]).tolist()}


def write_partial(path: str | os.PathLike, header: dict, state: Any, texts: dict[int, str] | None = None) -> None:
    from fflayers.io import atomic_write

    with atomic_write(path, "wb") as f:
        torch.save({"format": PARTIAL_FORMAT, **header, "state": state, "texts": texts or {}}, f)


def read_partial(path: str | os.PathLike) -> dict:
    try:
        data = torch_load_restricted(path)
    except UnsafePickleError:
        raise
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise AdapterError(f"partial {path} is unreadable ({type(err).__name__}); rerun its job") from None
    if not isinstance(data, dict) or data.get("format") != PARTIAL_FORMAT:
        raise AdapterError(f"{path} is not a partial result of generate_outputs.py --shard; pass the .shard-I-of-N.pt files")
    return data


def find_partials(output: str | os.PathLike) -> list[Path]:
    """``OUTPUT.shard-I-of-N.pt`` files beside ``output``."""
    output = Path(output)
    pattern = re.compile(re.escape(output.name) + r"\.shard-(\d+)-of-(\d+)\.pt$")
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if pattern.match(p.name))


def _merge_states(kind: str, states: list[Any]) -> Any:
    if kind == "trigger_examples":
        from fflayers.memories.topk import StreamingTopK

        out = StreamingTopK.from_state_dict(states[0])
        for state in states[1:]:
            out.merge(StreamingTopK.from_state_dict(state))
        return out.state_dict()
    import pandas as pd

    attrs = dict(states[0].attrs)
    df = pd.concat(states, ignore_index=True).sort_values(["sentence", "layer"], kind="stable").reset_index(drop=True)
    df.attrs.update(attrs)
    return df


def merge_partials(paths: Sequence[str | os.PathLike]) -> tuple[dict, Any, dict[int, str]]:
    """``(header, merged state, texts)`` of the partials of one run; refuses mixed or incomplete sets."""
    if not paths:
        raise AdapterError("no partials to merge; pass the OUTPUT.shard-I-of-N.pt files of every job")
    parts = [(Path(p), read_partial(p)) for p in paths]
    first_path, first = parts[0]
    for path, part in parts[1:]:
        if part["config_hash"] != first["config_hash"]:
            diff = sorted(k for k in set(part["config"]) | set(first["config"])
                          if repr(part["config"].get(k)) != repr(first["config"].get(k)))
            raise AdapterError(f"partials {first_path.name} and {path.name} come from different configurations "
                               f"(differ in: {', '.join(diff) or 'model or data'}); merge partials of one run only")
        if part["jobs"] != first["jobs"]:
            raise AdapterError(f"partials {first_path.name} and {path.name} split the run into {first['jobs']} and "
                               f"{part['jobs']} jobs; merge the partials of one job array")
    jobs = first["jobs"]
    seen = sorted(part["job"] for _, part in parts)
    if seen != list(range(jobs)):
        missing = sorted(set(range(jobs)) - set(seen))
        twice = sorted({j for j in seen if seen.count(j) > 1})
        raise AdapterError(f"the partials of a {jobs}-job run must be jobs 0..{jobs - 1} once each "
                           f"(missing: {missing or 'none'}, repeated: {twice or 'none'}); rerun the missing jobs")
    shards = sorted(s for _, part in parts for s in part["shards"])
    if shards != list(range(first["n_shards"])):
        raise AdapterError(f"the partials cover shards {shards[:10]}..., not 0..{first['n_shards'] - 1} once each; "
                           "rerun the jobs of one plan (same run folder)")
    states = [part["state"] for _, part in parts if part["state"] is not None]
    texts: dict[int, str] = {}
    for _, part in parts:
        texts.update(part["texts"])
    return first, _merge_states(first["kind"], states), texts


def write_scan_output(output: str | os.PathLike, kind: str, state: Any, config: dict, texts: dict[int, str] | Sequence[str]) -> None:
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
    result = TriggerExamples(state["values"], state["sentence_ids"], state["positions"], list(config["layers"]),
                             list(config["dims"]), int(config["k"]), n)
    if output.suffix.lower() in TABLE_SUFFIXES:
        table = result.to_frame()
        table["text"] = [texts[i] for i in table["sentence_id"]]
        write_table(output, table)
    else:
        write_jsonl(output, result.to_jsonl_rows(texts))
