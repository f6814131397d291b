"""The linear-shortcut fits as runs of fflayers.runs, end to end on the tiny GPT-2: a fit killed with SIGKILL
resumes to the same files computing only its unfinished blocks, a rerun with another option or another corpus
is refused in one line, a run folder of another analysis too, the submodule pass resumes alike, and two gloo
ranks under torchrun write the files of one process. One thread per process everywhere: float results of
matrix products can differ in the last bit with the thread count."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analysis import embedding_space as es
from analysis import linear_shortcuts as ls
from fflayers.embedding_space.export import ExportTask
from fflayers.shortcuts.passes import PointsPass, StatesPass
from tests.runs.killing import kill_after_shards

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).parent / "torchrun"
RUN = "maps.safetensors.ckpt"
WORDS = ("the river town bridge king castle team game season museum city village paint wheat north old young "
         "music album water moon station hour journey coach players farmers army hill").split()
WRAPPER = """
import os, sys, time
sys.path.insert(0, {repo!r})
from analysis import linear_shortcuts as ls
from fflayers.shortcuts.passes import StatesPass
read = StatesPass.read
def slow_read(self, positions, progress):
    time.sleep(float(os.environ.get("SLOW_BLOCK_S", "0")))
    return read(self, positions, progress)
StatesPass.read = slow_read
sys.exit(ls.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."
             for _ in range(90)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def fit_args(model: Path, corpus: Path) -> list:
    return ["fit", "--hf_model", model, "--device", "cpu", "--quiet", "--data_file", corpus,
            "--train_sentences", 60, "--val_sentences", 10, "--shard_positions", 5, "--batch_size", 4]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = ls.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def whole(tiny_gpt2_dir, corpus, tmp_path_factory) -> Path:
    """An uninterrupted fit (one thread), without --resume."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("whole") / "fit"
    try:
        assert ls.main([str(a) for a in [*fit_args(tiny_gpt2_dir, corpus), "--output_dir", out]]) == 0
    finally:
        torch.set_num_threads(n)
    assert sorted(os.listdir(out)) == ["fit.meta.json", "maps.safetensors", "positions.parquet"]  # no run dir
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


def same_files(a: Path, b: Path, names=("positions.parquet", "maps.safetensors")) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def interrupted(main, argv) -> None:
    """Run ``main(argv)`` and check that it stopped on KeyboardInterrupt (exit code 130, or raised)."""
    try:
        rc = main([str(a) for a in argv])
    except KeyboardInterrupt:
        return
    assert rc == 130


def interrupt_after(monkeypatch, cls, method: str, calls: int) -> None:
    """``cls.method`` raises KeyboardInterrupt at call ``calls + 1`` (a run stopped in the middle)."""
    real, seen = getattr(cls, method), []

    def dying(self, *args, **kwargs):
        if len(seen) >= calls:
            raise KeyboardInterrupt
        seen.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, dying)


def test_sigkill_then_resume_computes_only_the_unfinished_blocks(tiny_gpt2_dir, corpus, whole, tmp_path,
                                                                 one_thread, capsys, monkeypatch):
    cut = tmp_path / "cut"
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER.format(repo=str(REPO)))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", SLOW_BLOCK_S="0.4")
    argv = [sys.executable, str(script), *map(str, fit_args(tiny_gpt2_dir, corpus)), "--output_dir", str(cut),
            "--resume"]
    kill_after_shards(argv, cut / RUN, 3, env=env, cwd=tmp_path)
    assert os.listdir(cut) == [RUN]  # positions and maps are written after the pass only
    shards = json.loads((cut / RUN / "manifest.json").read_text())["shards"]
    n_done = [s["status"] for s in shards].count("done")
    assert len(shards) == 12 and 3 <= n_done < 12  # one block of 5 positions per shard
    unfinished = [u for u, s in enumerate(shards) if s["status"] != "done"]

    computed: list[int] = []
    real = StatesPass.run_units

    def counting(self, units, progress):
        computed.extend(units)
        return real(self, units, progress)

    monkeypatch.setattr(StatesPass, "run_units", counting)
    rc, out, err = run_cli([*fit_args(tiny_gpt2_dir, corpus), "--output_dir", cut, "--resume"], capsys)
    assert rc == 0, err
    assert f"12 shards of 12 blocks of positions; computed {12 - n_done}, reused {n_done}" in out
    assert sorted(computed) == unfinished  # nothing finished is computed again
    same_files(cut, whole)
    assert not (cut / RUN).exists()  # removed once the output is written


def test_a_changed_option_or_corpus_is_refused(tiny_gpt2_dir, corpus, whole, tmp_path, one_thread, capsys,
                                               monkeypatch):
    data = tmp_path / "corpus.txt"
    shutil.copy(corpus, data)
    out = tmp_path / "fit"
    fit = [*fit_args(tiny_gpt2_dir, data), "--output_dir", out, "--resume"]
    interrupt_after(monkeypatch, StatesPass, "read", 2)
    interrupted(ls.main, fit)
    monkeypatch.undo()
    assert os.listdir(out) == [RUN] and shard_status(out / RUN).count("done") == 2

    def changed(flag: str, value) -> list:
        if flag not in fit:
            return [*fit, flag, value]
        i = fit.index(flag)
        return [*fit[: i + 1], value, *fit[i + 2 :]]

    for argv, name in ((changed("--seed", 7), "seed"), (changed("--batch_size", 8), "batch_size"),
                       (changed("--train_sentences", 59), "train_sentences")):
        rc, _, err = run_cli(argv, capsys)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and "another configuration" in lines[0], err
        assert f"{name} is " in lines[0], err
        assert os.listdir(out) == [RUN]  # refused before anything is written: positions.parquet neither
    data.write_text(corpus.read_text().replace("river", "mountain"))  # same path, other content
    rc, _, err = run_cli(fit, capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "differs in:" in lines[0] and "data_file" in lines[0], err
    shutil.copy(corpus, data)
    rc, stdout, err = run_cli(fit, capsys)  # the same settings and corpus again: resumed
    assert rc == 0 and "computed 10, reused 2" in stdout, err
    same_files(out, whole)


def test_resume_on_a_run_folder_of_another_analysis(tiny_gpt2_dir, corpus, tmp_path, capsys, monkeypatch):
    export = tmp_path / "values.parquet"
    interrupt_after(monkeypatch, ExportTask, "run_units", 1)
    interrupted(es.main, ["export", "--hf_model", tiny_gpt2_dir, "--device", "cpu", "--quiet",
                          "--output_file", export, "--resume"])
    monkeypatch.undo()
    out = tmp_path / "fit"
    out.mkdir()
    shutil.move(f"{export}.ckpt", out / RUN)
    rc, _, err = run_cli([*fit_args(tiny_gpt2_dir, corpus), "--output_dir", out, "--resume"], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert "embedding_export" in lines[0] and "shortcut_fit" in lines[0], err
    assert sorted(os.listdir(out)) == [RUN]


def test_submodule_pass_resumes_to_the_same_maps(tiny_gpt2_dir, whole, tmp_path, one_thread, capsys,
                                                 monkeypatch):
    one, cut = tmp_path / "one", tmp_path / "cut"
    for folder in (one, cut):
        folder.mkdir()
        shutil.copy(whole / "positions.parquet", folder)
    sub = ["submodules", "--hf_model", tiny_gpt2_dir, "--device", "cpu", "--quiet", "--batch_size", 4,
           "--shard_positions", 8, "--eval_positions", 4]
    rc, _, err = run_cli([*sub, "--output_dir", one], capsys)
    assert rc == 0, err
    assert not (one / "submodule_maps.safetensors.ckpt").exists()
    interrupt_after(monkeypatch, PointsPass, "read", 3)
    interrupted(ls.main, [*sub, "--output_dir", cut, "--resume"])
    monkeypatch.undo()
    assert not (cut / "submodule_maps.safetensors").exists()
    rc, _, err = run_cli([*sub, "--output_dir", cut, "--resume", "--layers", 1], capsys)
    assert rc == 2 and "layers is [1] here, [0, 1] in the run folder" in err, err
    rc, stdout, err = run_cli([*sub, "--output_dir", cut, "--resume"], capsys)
    assert rc == 0 and "8 shards of 8 blocks of positions; computed 5, reused 3" in stdout, err
    same_files(cut, one, ("submodule_maps.safetensors", "submodule_r2.tsv", "submodule_evaluate.tsv"))
    assert not (cut / "submodule_maps.safetensors.ckpt").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(tiny_gpt2_dir, corpus, whole, tmp_path):
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER.format(repo=str(REPO)))
    out = tmp_path / "two"
    argv = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(free_port()), str(script),
            *map(str, fit_args(tiny_gpt2_dir, corpus)), "--output_dir", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("12 shards of 12 blocks of positions; computed 12, reused 0") == 1, proc.stdout
    same_files(out, whole)
    assert sorted(os.listdir(out)) == ["fit.meta.json", "maps.safetensors", "positions.parquet"]
