"""Run folders that conflict with the request are refused in one line: another analysis, an older format,
another config (each differing option named with both values); nothing in the folder changes."""

from __future__ import annotations

import json

import pytest

from fflayers.core import RunStateError
from fflayers.runs import FORMAT, Manifest, run_units
from tests.runs.toy import KIND, ToyConfig, ToyTask

PLAN = {"shards": [[0, 2], [2, 3]], "shard_weights": [5, 4], "unit_name": "facts"}


def run(tmp_path, config, kind=KIND, **kw):
    return run_units(ToyTask(config), config, kind=kind, run_dir=tmp_path / "run", progress=False, **kw)


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_manifest_open_update_and_left(tmp_path):
    man = Manifest(tmp_path / "run")
    data = man.open("x", {"k": 3}, "hash-a", lambda: PLAN)
    assert data["format"] == FORMAT == "fflayers-run/1" and data["kind"] == "x"
    assert [s["facts"] for s in data["shards"]] == [5, 4] and data["left"] == {"shards": 2, "facts": 9}
    man.update(1, status="done")
    assert man.read()["left"] == {"shards": 1, "facts": 5}
    again = man.open("x", {"k": 3}, "hash-a", lambda: pytest.fail("the plan was made again"))
    assert again["shards"][1]["status"] == "done"


def test_another_analysis_is_refused(tmp_path):
    run(tmp_path, ToyConfig())
    before = (tmp_path / "run" / "manifest.json").read_text()
    with pytest.raises(RunStateError) as err:
        run(tmp_path, ToyConfig(), kind="other-analysis")
    msg = one_line(err)
    assert f"holds a run of {KIND}, not of other-analysis" in msg and "delete" in msg
    assert (tmp_path / "run" / "manifest.json").read_text() == before


@pytest.mark.parametrize("found", ["fflayers-scan/1", "fflayers-run/0", None])
def test_another_format_is_refused(tmp_path, found):
    run(tmp_path, ToyConfig())
    path = tmp_path / "run" / "manifest.json"
    data = json.loads(path.read_text())
    if found is None:
        del data["format"]
    else:
        data["format"] = found
    path.write_text(json.dumps(data))
    with pytest.raises(RunStateError) as err:
        run(tmp_path, ToyConfig())
    msg = one_line(err)
    assert f"format {found or 'unknown'}, this version reads fflayers-run/1" in msg
    assert f"delete {tmp_path / 'run'} to start over" in msg


def test_unreadable_manifest_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text("{not json")
    with pytest.raises(RunStateError, match="manifest .* is unreadable"):
        run(tmp_path, ToyConfig())


def test_another_config_names_each_option_with_both_values(tmp_path):
    run(tmp_path, ToyConfig(units=12, scale=1))
    before = (tmp_path / "run" / "manifest.json").read_text()
    with pytest.raises(RunStateError) as err:
        run(tmp_path, ToyConfig(units=12, scale=3))
    msg = one_line(err)
    assert "another configuration (differs in: scale); scale is 3 here, 1 in the run folder;" in msg
    assert "units" not in msg.split("differs in:")[1]  # an option that did not change is not named
    with pytest.raises(RunStateError) as err:
        run(tmp_path, ToyConfig(units=12, scale=2), fingerprints={"data": "abc"})
    msg = one_line(err)
    assert "(differs in: data, scale)" in msg
    assert "data is abc here, (not set) in the run folder" in msg and "scale is 2 here, 1 in" in msg
    assert (tmp_path / "run" / "manifest.json").read_text() == before


def test_fingerprints_are_part_of_the_key(tmp_path):
    first = run(tmp_path, ToyConfig(), fingerprints={"model": "m1", "facts_file": "f1"})
    assert first.config == {"units": 12, "scale": 1, "model": "m1", "facts_file": "f1"}
    again = run(tmp_path, ToyConfig(), fingerprints={"model": "m1", "facts_file": "f1"})
    assert again.reused == again.plan["n_shards"] and again.computed_all == 0
    with pytest.raises(RunStateError, match=r"facts_file is f2 here, f1 in the run folder"):
        run(tmp_path, ToyConfig(), fingerprints={"model": "m1", "facts_file": "f2"})


def test_a_nested_config_names_the_option_inside_it():
    """A config holding another (the knowledge-neuron run's search settings) names ``search.steps``, not
    ``search``; a key one side lacks is named whole."""
    from fflayers.runs.manifest import config_differences

    here = {"search": {"steps": 20, "p": 0.5}, "countries": True}
    stored = {"search": {"steps": 10, "p": 0.5}, "countries": True, "extra": {"a": 1}}
    assert config_differences(here, stored) == [("extra", "(not set)", '{"a": 1}'),
                                                ("search.steps", "20", "10")]
