"""Two gloo ranks under torchrun split the shards and give the result of one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from fflayers.runs import run_units
from tests.runs.toy import KIND, ToyConfig, ToyTask, logged_units

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).parent / "torchrun"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_process(tmp_path):
    log, result = tmp_path / "units.log", tmp_path / "result.pt"
    argv = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "tests.runs.toy",
            "--out", str(result), "--run_dir", str(tmp_path / "run"), "--unit_log", str(log), "--units", "10",
            "--shard_weight", "1000"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = torch.load(result, weights_only=False)
    assert two["workers"] == 2 and two["n_shards"] == 8 and two["computed_all"] == 8  # 4 per rank

    units = logged_units(log)
    by_rank = {r: sorted(u for q, u in units if q == r) for r in (0, 1)}
    assert by_rank[0] and by_rank[1] and sorted(by_rank[0] + by_rank[1]) == list(range(10))
    assert max(by_rank[0]) < min(by_rank[1])  # contiguous shares: rank 0 the first shards

    config = ToyConfig(units=10)
    one = run_units(ToyTask(config), config, kind=KIND, shard_weight=1, progress=False)
    assert two["state"]["count"] == one.result.count == 10
    assert torch.equal(two["state"]["total"], one.result.total)
