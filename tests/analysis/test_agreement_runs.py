"""``key_value_agreement.py --resume`` on fflayers.runs (tiny fairseq LM): a run killed with SIGKILL resumes
to the bytes of an uninterrupted run, computing only the units of unfinished shards; reruns with another
option, edited textual files or another analysis's run folder are refused in one line. One thread per
process: float results of matrix products can differ in the last bit with the thread count."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from analysis import key_value_agreement as kva
from fflayers.backends.fairseq_loading import load_fairseq_lm
from fflayers.memories.agreement import AgreementTask
from fflayers.memories.textual import format_line, write_marker
from fflayers.runs import MANIFEST
from tests.runs.killing import kill_after_shards

REPO = Path(__file__).resolve().parents[2]
OUTPUTS = ("kv.tsv", "kv_random.tsv", "kv_max_probs.json")

# runs the script itself; only slows it down (a pause after each finished shard) so that the test can kill it
SLOW_SCRIPT = """
import runpy, sys, time
from fflayers.runs import Manifest
update = Manifest.update
def slow_update(self, shard, **fields):
    update(self, shard, **fields)
    if fields.get("status") == "done":
        time.sleep(1.0)
Manifest.update = slow_update
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lm(fairseq_adaptive_lm):
    adapter = load_fairseq_lm(fairseq_adaptive_lm.model_dir, device="cpu")
    return adapter, fairseq_adaptive_lm.model_dir


def write_textual(folder: Path, adapter) -> Path:
    """Trigger files for a few keys of both layers (dictionary words as targets)."""
    folder.mkdir()
    d = adapter.dictionary
    words = [d[i] for i in range(d.nspecial, len(d))]
    keys = {(0, 3): words[:6], (0, 200): words[10:13], (1, 10): ["the", "city"], (1, 255): words[:30]}
    for (layer, dim), targets in keys.items():
        lines = [format_line(10.0 - j, f"w{j} prefix", t) for j, t in enumerate(targets)]
        (folder / f"{dim}_{layer}.txt").write_text("\n".join(lines) + "\n")
    write_marker(folder, adapter.vocab)
    return folder


def args_for(model_dir: Path, data: Path, base: Path, *more) -> list[str]:
    return [str(a) for a in ["--model_dir", model_dir, "--data_dir", data, "--output_base", base, "--device",
                             "cpu", "--chunk_values", 8, "--random_baseline", "--quiet", *more]]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("key_value_agreement.py: error:"), err
    return err[0]


def killed_run(argv: list[str], run_dir: Path) -> dict:
    """Start the script with ``argv``, SIGKILL it once its manifest shows a finished shard; returns the
    manifest."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    script = str(REPO / "analysis" / "key_value_agreement.py")
    return kill_after_shards([sys.executable, "-c", SLOW_SCRIPT, script, *argv], run_dir, 1, env=env,
                             timeout_s=120)


def test_sigkill_then_resume_gives_the_uninterrupted_bytes(lm, tmp_path, one_thread, capsys, monkeypatch):
    adapter, model_dir = lm
    data = write_textual(tmp_path / "textual", adapter)
    ref, out = tmp_path / "ref", tmp_path / "out"
    ref.mkdir()
    out.mkdir()
    assert kva.main(args_for(model_dir, data, ref / "kv")) == 0
    run_dir = out / "kv.ckpt"

    manifest = killed_run(args_for(model_dir, data, out / "kv", "--resume"), run_dir)
    status = [s["status"] for s in manifest["shards"]]
    n_done = status.count("done")
    assert manifest["kind"] == "agreement" and 1 <= n_done < len(status) == 4, status
    assert manifest["plan"]["n_units"] == 2 * adapter.n_layers * adapter.d_ff // 8  # values, then random ones
    assert not any((out / name).exists() for name in OUTPUTS)

    # reruns with another option, or with a textual file edited in place, are refused and change nothing
    capsys.readouterr()
    assert kva.main(args_for(model_dir, data, out / "kv", "--resume", "--chunk_values", 16)) == 2
    line = one_line_error(capsys)
    assert "(differs in: chunk_values); chunk_values is 16 here, 8 in the run folder" in line, line
    assert kva.main(args_for(model_dir, data, out / "kv", "--resume", "--seed", 1)) == 2
    assert "(differs in: seed)" in one_line_error(capsys)
    edited = data / "3_0.txt"
    original = edited.read_bytes()
    edited.write_text(original.decode().replace("10.0\t", "11.0\t", 1))
    assert kva.main(args_for(model_dir, data, out / "kv", "--resume")) == 2
    assert "(differs in: textual)" in one_line_error(capsys)
    edited.write_bytes(original)
    moved = shutil.copytree(data, tmp_path / "moved")  # the same content elsewhere is the same input
    assert json.loads((run_dir / MANIFEST).read_text())["shards"] == manifest["shards"]

    units: list[int] = []
    run_units = AgreementTask.run_units
    monkeypatch.setattr(AgreementTask, "run_units",
                        lambda self, r, progress: units.extend(r) or run_units(self, r, progress))
    assert kva.main(args_for(model_dir, moved, out / "kv", "--resume")) == 0
    pending = [u for s in manifest["shards"] if s["status"] != "done" for u in range(*s["units"])]
    assert sorted(units) == pending
    assert f"computed {len(status) - n_done}, reused {n_done} finished shard(s)" in capsys.readouterr().out
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert not run_dir.exists()


def test_resume_on_another_analysis_run_folder_is_refused(lm, tmp_path, capsys):
    from fflayers.memories.trigger_examples import trigger_examples

    adapter, model_dir = lm
    data = write_textual(tmp_path / "textual", adapter)
    base = tmp_path / "kv"
    sentences = [adapter.vocab.tokenize("the city was built in 1850 .")] * 3
    trigger_examples(adapter, sentences, k=2, progress=False, checkpoint_dir=f"{base}.ckpt")
    before = sorted(tmp_path.rglob("*"))
    capsys.readouterr()
    assert kva.main(args_for(model_dir, data, base, "--resume")) == 2
    line = one_line_error(capsys)
    assert "holds a run of trigger_examples, not of agreement" in line, line
    assert sorted(tmp_path.rglob("*")) == before
