"""Pickles from users never run code: an evil pickle through every reader of a .pkl / torch file.

The evil object's ``__reduce__`` names ``os.system`` with a command that creates a marker file; a reader that
called it would create the file. Every reader must refuse with one line naming the function, and the marker
must never exist. Real pandas / numpy pickles (old and new layouts of what fflayers writes) still load.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import merge_shards
from analysis import plot_memories as pm
from fflayers.runs import load_shard, shard_file
from fflayers.safe_pickle import UnsafePickleError, load_pickle, restricted_loads, torch_load_restricted


class Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class EvilViaBuiltins:
    """Reaches ``os.system`` through ``builtins.getattr`` / ``__import__`` instead of naming it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (eval, (f"__import__('os').system('touch {self.marker}')",))


class EvilViaPandas:
    """Hides the payload in a second pickle that ``pandas.read_pickle`` would load unrestricted."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (pd.read_pickle, (self.path,))


def evil_frame(marker) -> pd.DataFrame:
    """A real-looking ffn-info table with the payload in one cell."""
    return pd.DataFrame({"layer": [0, 1], "active_memories": [3, 4], "payload": [Evil(marker), 1]})


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "the pickle's code ran"


@pytest.mark.parametrize("make", [Evil, EvilViaBuiltins, evil_frame])
def test_restricted_loads_refuses_code(make, marker):
    data = pickle.dumps(make(marker))
    with pytest.raises(UnsafePickleError, match="nothing of it ran"):
        restricted_loads(data)


def test_second_pickle_through_pandas_is_refused(tmp_path, marker):
    inner = tmp_path / "inner.pkl"
    inner.write_bytes(pickle.dumps(Evil(marker)))
    outer = tmp_path / "outer.pkl"
    outer.write_bytes(pickle.dumps(EvilViaPandas(inner)))
    with pytest.raises(UnsafePickleError, match="read_pickle"):
        load_pickle(outer)


def test_real_tables_load_equal(tmp_path):
    frame = pd.DataFrame({
        "layer": np.arange(4, dtype=np.int64),
        "prob": np.linspace(0, 1, 4),
        "top1": [True, False, True, False],
        "token": ["a", "b", None, "d"],
        "coefficients": [np.arange(3, dtype=np.float32) + i for i in range(4)],
        "ranks": [[1, 2], [], [3], [4, 5, 6]],
        "cat": pd.Categorical(["x", "y", "x", "y"]),
    }, index=pd.Index([10, 11, 12, 13], name="row"))
    frame.attrs["d_ff"] = 64
    for protocol in (2, 4, 5):
        path = tmp_path / f"t{protocol}.pkl"
        with open(path, "wb") as f:
            pickle.dump(frame, f, protocol=protocol)
        back = load_pickle(path)
        pd.testing.assert_frame_equal(back.drop(columns=["coefficients"]),
                                      frame.drop(columns=["coefficients"]))
        assert all(np.array_equal(a, b)
                   for a, b in zip(back["coefficients"], frame["coefficients"], strict=True))
        assert back.attrs == {"d_ff": 64}
    frame.to_pickle(tmp_path / "pandas.pkl")
    pd.testing.assert_frame_equal(load_pickle(tmp_path / "pandas.pkl"), frame)


def test_trust_reads_in_full(tmp_path):
    path = tmp_path / "obj.pkl"
    path.write_bytes(pickle.dumps(pd.Timestamp("2020-01-01").to_pydatetime().replace(tzinfo=None)))
    assert load_pickle(path, trust=True).year == 2020


def one_line_error(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error:"), err
    return lines[0]


def test_plot_memories_refuses_evil_pkl(tmp_path, marker, capsys):
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(evil_frame(marker)))
    out = tmp_path / "figs"
    assert pm.main(["--ffn_info", str(evil), "--output_dir", str(out)]) == 2
    line = one_line_error(capsys, "plot_memories.py")
    assert "posix.system" in line or "os.system" in line
    assert "--trust-checkpoint" in line and not out.exists()


def test_torch_files_refuse_code(tmp_path, marker):
    path = tmp_path / "x.pt"
    torch.save({"state": Evil(marker), "t": torch.ones(2)}, path)
    with pytest.raises(UnsafePickleError):
        torch_load_restricted(path)
    good = tmp_path / "good.pt"
    state = {"t": torch.arange(6.0).reshape(2, 3), "frame": pd.DataFrame({"a": [1, 2]}), "n": [1, (2, 3)]}
    torch.save(state, good)
    back = torch_load_restricted(good)
    assert torch.equal(back["t"], state["t"]) and back["n"] == [1, (2, 3)]
    pd.testing.assert_frame_equal(back["frame"], state["frame"])


def test_merge_shards_refuses_evil_partial(tmp_path, marker, capsys):
    out = tmp_path / "top.jsonl"
    for i in range(2):
        torch.save({"format": Evil(marker)}, tmp_path / f"top.jsonl.shard-{i}-of-2.pt")
    assert merge_shards.main(["--output_file", str(out)]) == 2
    assert "system" in one_line_error(capsys, "merge_shards.py") and not out.exists()


def test_scan_shard_refuses_evil_state(tmp_path, marker):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"config_hash": "h", "shard": 0, "state": Evil(marker)}, shard_file(run_dir, 0))
    with pytest.raises(UnsafePickleError):
        load_shard(run_dir, 0, "h")
