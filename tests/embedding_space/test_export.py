"""The export task: its units are the tables of iter_neuron_tokens, in order; merged parts keep no rows; the
registered merge of states puts the tables in unit order; the written table equals one pass's."""

from __future__ import annotations

import pandas as pd
import pytest

from fflayers.backends.hf import HFAdapter
from fflayers.core import FflayersError
from fflayers.embedding_space import embedding_matrix, iter_neuron_tokens
from fflayers.embedding_space.export import (
    ExportConfig,
    ExportTask,
    embedding_digest,
    export_table,
    merge_export_states,
)
from fflayers.runs import merge_function
from tests.fixtures.hf_models import FF, LAYERS, tiny_model


@pytest.fixture(scope="module")
def adapter() -> HFAdapter:
    adapter = HFAdapter(tiny_model("gpt2"), device="cpu")
    adapter.vocab.id_to_token = lambda ids: [f"t{i}" for i in ids]  # a tokenizer-less model: ids as text
    return adapter


def test_units_are_the_tables_of_one_pass(adapter):
    E = embedding_matrix(adapter)
    config = ExportConfig([2, 0], ["value", "key"], k=3, embedding="output", chunk=24)
    task = ExportTask(adapter, E, config)
    per_layer_side = -(-FF // 24)
    assert task.n_units == 2 * 2 * per_layer_side and task.unit_weight(2) == (FF - 48) * 3
    part = task.run_units(range(task.n_units), lambda _n: None)
    want = list(iter_neuron_tokens(adapter, E, [2, 0], ["value", "key"], k=3, chunk=24))
    assert len(part.frames) == len(want)
    for got, ref in zip(part.frames, want, strict=True):
        pd.testing.assert_frame_equal(got, ref)
    halves = [task.run_units(range(5, task.n_units), lambda _n: None),
              task.run_units(range(5), lambda _n: None)]
    merged = task.merge([task.from_state(task.to_state(p)) for p in halves])
    assert merged.units == list(range(task.n_units)) and merged.frames is None
    states = [task.to_state(p) for p in halves]
    table = merge_function("embedding_export")(states)
    assert table["units"] == merged.units
    for got, ref in zip(table["frames"], want, strict=True):
        pd.testing.assert_frame_equal(got, ref)
    with pytest.raises(FflayersError, match="without its rows"):
        merge_export_states([task.to_state(merged)])


def test_bad_settings_and_the_embedding_digest(adapter):
    E = embedding_matrix(adapter)
    with pytest.raises(FflayersError, match="vocabulary size"):
        ExportTask(adapter, E, ExportConfig([0], ["value"], k=10**6, embedding="output"))
    with pytest.raises(FflayersError, match="unknown side"):
        ExportTask(adapter, E, ExportConfig([0], ["values"], k=3, embedding="output"))
    with pytest.raises(FflayersError, match="out of range"):
        ExportTask(adapter, E, ExportConfig([LAYERS], ["value"], k=3, embedding="output"))
    assert embedding_digest(E) == embedding_digest(embedding_matrix(adapter))


def test_export_table_streams_the_shards_in_order(adapter, tmp_path):
    E = embedding_matrix(adapter)
    config = ExportConfig(list(range(LAYERS)), ["key", "value"], k=2, embedding="output", chunk=16)
    out = tmp_path / "t.parquet"
    rows, run = export_table(adapter, E, out, config, progress=False)
    want = pd.concat(iter_neuron_tokens(adapter, E, list(range(LAYERS)), ["key", "value"], k=2, chunk=16),
                     ignore_index=True)
    assert rows == len(want) == LAYERS * 2 * FF * 2 and run.plan["n_shards"] == 4
    pd.testing.assert_frame_equal(pd.read_parquet(out), want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]
