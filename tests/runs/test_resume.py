"""A run killed with SIGKILL mid-run resumes: the rerun computes only the units of unfinished shards, and the
result equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from fflayers.runs import run_units
from tests.runs.killing import kill_after_shards
from tests.runs.toy import KIND, ToyConfig, ToyTask, expected, logged_units

REPO = Path(__file__).resolve().parents[2]


def test_sigkill_then_resume(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "units.log"
    argv = [sys.executable, "-m", "tests.runs.toy", "--out", str(tmp_path / "never.pt"),
            "--run_dir", str(run_dir), "--unit_log", str(log), "--units", "12", "--sleep", "0.25"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    kill_after_shards(argv, run_dir, 3, env=env, cwd=REPO, timeout_s=120)
    assert not (tmp_path / "never.pt").exists()

    manifest = json.loads((run_dir / "manifest.json").read_text())
    status = [s["status"] for s in manifest["shards"]]
    n_done = status.count("done")
    assert len(status) == 12 and 3 <= n_done < 12, status  # one unit per shard (shard_weight 1)
    killed_computed = [u for _, u in logged_units(log)]
    unfinished = [u for s in manifest["shards"] if s["status"] != "done" for u in range(*s["units"])]

    config = ToyConfig(units=12)
    computed: list[int] = []
    out = run_units(ToyTask(config, on_unit=computed.append), config, kind=KIND, run_dir=run_dir,
                    shard_weight=1, progress=False)
    assert sorted(computed) == unfinished and len(computed) == 12 - n_done  # nothing finished is redone
    assert out.reused == n_done and out.computed_all == 12 - n_done
    finished = {u for s in manifest["shards"] if s["status"] == "done" for u in range(*s["units"])}
    assert set(killed_computed) >= finished  # the killed run computed what it finished

    whole = run_units(ToyTask(config), config, kind=KIND, shard_weight=1, progress=False)  # uninterrupted
    want = expected(config)
    assert out.result.count == whole.result.count == want.count == 12
    assert torch.equal(out.result.total, whole.result.total) and torch.equal(out.result.total, want.total)
    assert json.loads((run_dir / "manifest.json").read_text())["left"] == {"shards": 0, "weight": 0}


def test_a_resume_keeps_the_settings_of_the_plan(tmp_path):
    config, seen = ToyConfig(units=6), []

    def build(settings):
        seen.append(settings["batch"])
        return ToyTask(config)

    run_dir = tmp_path / "run"
    first = run_units(build, config, kind=KIND, run_dir=run_dir, settings={"batch": 64}, progress=False)
    again = run_units(build, config, kind=KIND, run_dir=run_dir, settings={"batch": 32}, progress=False)
    assert first.plan["settings"] == again.plan["settings"] == {"batch": 64} and set(seen) == {64}
    assert again.reused == first.plan["n_shards"] and again.computed_all == 0
    fresh = run_units(build, config, kind=KIND, settings={"batch": 32}, progress=False)  # no run folder
    assert fresh.plan["settings"] == {"batch": 32} and seen[-1] == 32
