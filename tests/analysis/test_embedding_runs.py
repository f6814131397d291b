"""The embedding-space export as a run of fflayers.runs, end to end on the tiny GPT-2: an export killed with
SIGKILL resumes to the same parquet file computing only its unfinished blocks, a rerun with another option or
changed model weights is refused in one line, a run folder of another analysis too, a run without --resume
leaves nothing behind (also after an error), and two gloo ranks under torchrun write the file of one
process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analysis import embedding_space as es
from analysis import linear_shortcuts as ls
from fflayers.core import InputError
from fflayers.embedding_space.export import ExportTask
from fflayers.shortcuts.passes import StatesPass
from tests.runs.killing import kill_after_shards

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).parent / "torchrun"
WRAPPER = """
import os, sys, time
sys.path.insert(0, {repo!r})
from analysis import embedding_space as es
from fflayers.embedding_space.export import ExportTask
run_units = ExportTask.run_units
def slow(self, units, progress):
    time.sleep(float(os.environ.get("SLOW_UNIT_S", "0")))
    return run_units(self, units, progress)
ExportTask.run_units = slow
sys.exit(es.main(sys.argv[1:]))
"""


def export_args(model: Path, output: Path) -> list:
    return ["export", "--hf_model", model, "--device", "cpu", "--quiet", "--sides", "key", "value", "--k", 3,
            "--output_file", output]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = es.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def interrupted(main, argv) -> None:
    """Run ``main(argv)`` and check that it stopped on KeyboardInterrupt (exit code 130, or raised)."""
    try:
        rc = main([str(a) for a in argv])
    except KeyboardInterrupt:
        return
    assert rc == 130


def fail_after(monkeypatch, cls, method: str, calls: int, error: BaseException) -> None:
    """``cls.method`` raises ``error`` at call ``calls + 1``."""
    real, seen = getattr(cls, method), []

    def failing(self, *args, **kwargs):
        if len(seen) >= calls:
            raise error
        seen.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, failing)


@pytest.fixture(scope="module")
def whole(tiny_gpt2_dir, tmp_path_factory) -> Path:
    """An uninterrupted export (one thread), without --resume: the folder holds the table and its metadata."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("whole") / "values.parquet"
    try:
        assert es.main([str(a) for a in export_args(tiny_gpt2_dir, out)]) == 0
    finally:
        torch.set_num_threads(n)
    assert sorted(os.listdir(out.parent)) == ["values.parquet", "values.parquet.meta.json"]
    return out


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def shard_status(run_dir: Path) -> list[str]:
    try:
        return [s["status"] for s in json.loads((run_dir / "manifest.json").read_text())["shards"]]
    except (OSError, ValueError, KeyError):
        return []


def test_sigkill_then_resume_computes_only_the_unfinished_blocks(tiny_gpt2_dir, whole, tmp_path, one_thread,
                                                                 capsys, monkeypatch):
    out = tmp_path / "values.parquet"
    run_dir = Path(f"{out}.ckpt")
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER.format(repo=str(REPO)))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", SLOW_UNIT_S="0.8")
    argv = [sys.executable, str(script), *map(str, export_args(tiny_gpt2_dir, out)), "--resume"]
    kill_after_shards(argv, run_dir, 2, env=env, cwd=tmp_path)
    assert not out.exists()
    shards = json.loads((run_dir / "manifest.json").read_text())["shards"]
    n_done = [s["status"] for s in shards].count("done")
    assert len(shards) == 4 and 2 <= n_done < 4  # (layer, side): one block of neurons each
    unfinished = [u for u, s in enumerate(shards) if s["status"] != "done"]

    computed: list[int] = []
    real = ExportTask.run_units

    def counting(self, units, progress):
        computed.extend(units)
        return real(self, units, progress)

    monkeypatch.setattr(ExportTask, "run_units", counting)
    rc, stdout, err = run_cli([*export_args(tiny_gpt2_dir, out), "--resume"], capsys)
    assert rc == 0, err
    assert f"4 shards of 4 blocks of neurons; computed {4 - n_done}, reused {n_done}" in stdout
    assert sorted(computed) == unfinished  # nothing finished is computed again
    assert out.read_bytes() == whole.read_bytes()
    assert not run_dir.exists() and json.loads(Path(f"{out}.meta.json").read_text())["config"]["rows"] == 384


def test_a_changed_option_or_model_is_refused(tiny_gpt2_dir, whole, tmp_path, one_thread, capsys,
                                              monkeypatch):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_gpt2_dir, model)
    out = tmp_path / "values.parquet"
    export = [*export_args(model, out), "--resume"]
    fail_after(monkeypatch, ExportTask, "run_units", 1, KeyboardInterrupt())
    interrupted(es.main, export)
    monkeypatch.undo()
    assert shard_status(Path(f"{out}.ckpt")).count("done") == 1 and not out.exists()
    for extra, name in ((["--k", 4], "k"), (["--sides", "value"], "sides"),
                        (["--embedding", "input"], "embedding"), (["--layers", 1], "layers")):
        rc, _, err = run_cli([*export, *extra], capsys)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and "another configuration" in lines[0], err
        assert f"{name} is " in lines[0], err
        assert not out.exists()
    weights = model / "model.safetensors"
    original = weights.read_bytes()
    tensors = load_file(weights)
    tensors["transformer.h.0.mlp.c_proj.weight"] *= 1.5
    save_file(tensors, weights, metadata={"format": "pt"})  # same path, other weights
    rc, _, err = run_cli(export, capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "differs in: model" in lines[0], err
    weights.write_bytes(original)
    rc, stdout, err = run_cli(export, capsys)  # the same settings and model again: resumed
    assert rc == 0 and "computed 3, reused 1" in stdout, err
    assert out.read_bytes() == whole.read_bytes()


def test_resume_on_a_run_folder_of_another_analysis(tiny_gpt2_dir, tmp_path, capsys, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"The river {w} flows north through the old town." for w in range(40)) + "\n")
    fit = tmp_path / "fit"
    fail_after(monkeypatch, StatesPass, "read", 1, KeyboardInterrupt())
    interrupted(ls.main, ["fit", "--hf_model", tiny_gpt2_dir, "--device", "cpu", "--quiet", "--data_file",
                          corpus, "--train_sentences", 30, "--val_sentences", 5, "--shard_positions", 10,
                          "--output_dir", fit, "--resume"])
    monkeypatch.undo()
    out = tmp_path / "values.parquet"
    shutil.move(fit / "maps.safetensors.ckpt", f"{out}.ckpt")
    rc, _, err = run_cli([*export_args(tiny_gpt2_dir, out), "--resume"], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert "shortcut_fit" in lines[0] and "embedding_export" in lines[0], err
    assert not out.exists()


def test_without_resume_nothing_is_left_behind(tiny_gpt2_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "values.parquet"
    fail_after(monkeypatch, ExportTask, "run_units", 2, InputError("a unit failed"))
    rc, _, err = run_cli(export_args(tiny_gpt2_dir, out), capsys)
    assert rc == 2 and "a unit failed" in err
    assert os.listdir(tmp_path) == []  # no output, no run folder, no shard files
    monkeypatch.undo()
    fail_after(monkeypatch, ExportTask, "run_units", 1, KeyboardInterrupt())
    interrupted(es.main, export_args(tiny_gpt2_dir, out))
    assert os.listdir(tmp_path) == []
    rc, _, err = run_cli([*export_args(tiny_gpt2_dir, out)[:-2], "--k", 50258, "--output_file", out], capsys)
    assert rc == 2 and "vocabulary size" in err and os.listdir(tmp_path) == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(tiny_gpt2_dir, whole, tmp_path):
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER.format(repo=str(REPO)))
    out = tmp_path / "two" / "values.parquet"
    out.parent.mkdir()
    argv = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(free_port()), str(script),
            *map(str, export_args(tiny_gpt2_dir, out))]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("4 shards of 4 blocks of neurons; computed 4, reused 0") == 1, proc.stdout
    assert out.read_bytes() == whole.read_bytes()
    assert sorted(os.listdir(out.parent)) == ["values.parquet", "values.parquet.meta.json"]
