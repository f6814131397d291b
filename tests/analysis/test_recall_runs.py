"""The recall tables on fflayers.runs (tiny GPT-2, real BPE vocabulary): a run killed with SIGKILL resumes to
the bytes of an uninterrupted run, computing only its unfinished blocks of facts; resumes with other options,
other input contents or another analysis's run folder are refused in one line; two gloo ranks under torchrun
write the table of one process; without --resume nothing but the output is left behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from analysis import dissect_recall as dr
from fflayers.cli import recall_analyses, tables
from tests.runs.killing import kill_after_shards

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).parent / "torchrun"

COUNTRIES = [("Norway", "Oslo"), ("Chile", "Santiago"), ("Peru", "Lima"), ("France", "Paris"),
             ("Spain", "Madrid"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Egypt", "Cairo")]
FACTS = [{"known_id": i, "subject": c, "attribute": a, "prompt": f"The capital of {c} is"}
         for i, (c, a) in enumerate(COUNTRIES)]

# the CLI in a subprocess with one fact per block (shard), each block logged ("RANK UNIT") and slowed down
WRAPPER = """
import os, sys, time
sys.path.insert(0, {repo!r})
from fflayers.cli import recall_analyses, tables
for name in recall_analyses.FACTS_PER_UNIT:
    recall_analyses.FACTS_PER_UNIT[name] = 1
compute = tables.FactBlocks.run_units
def logged(self, units, progress):
    out = compute(self, units, progress)
    with open(os.environ["UNIT_LOG"], "a") as f:
        f.write("".join(f"{{os.environ.get('RANK', '0')}} {{u}}\\n" for u in units))
    time.sleep(float(os.environ.get("UNIT_SLEEP", "0")))
    return out
tables.FactBlocks.run_units = logged
from analysis import dissect_recall
sys.exit(dissect_recall.main(sys.argv[1:]))
"""


@pytest.fixture
def facts_file(tmp_path):
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(FACTS))
    return path


@pytest.fixture
def paragraphs_file(tmp_path):
    path = tmp_path / "paragraphs.txt"
    path.write_text("Norway has fjords, oil and salmon.\nChile and Norway export fish and copper.\n"
                    "Peru and Lima.\nNothing about anyone.\n")
    return path


def knockout_argv(model, facts, out, *extra):
    return ["knockout", "--hf_model", model, "--device", "cpu", "--quiet", "--facts", facts, "--output", out,
            "--window", 1, *extra]


def run_cli(argv, capsys):
    capsys.readouterr()
    rc = dr.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def subprocess_env(log: Path, sleep: float = 0.0) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", UNIT_LOG=str(log),
                UNIT_SLEEP=str(sleep))


def wrapper(tmp: Path) -> Path:
    script = tmp / "wrapper.py"
    script.write_text(WRAPPER.format(repo=str(REPO)))
    return script


def logged_units(log: Path) -> list[tuple[int, int]]:
    if not log.is_file():
        return []
    return [(int(r), int(u)) for r, u in (line.split() for line in log.read_text().splitlines())]


def manifest_of(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def test_sigkill_then_resume_recomputes_only_unfinished_blocks(tiny_gpt2_dir, facts_file, tmp_path):
    script, out, run_dir = wrapper(tmp_path), tmp_path / "k.parquet", tmp_path / "k.parquet.ckpt"
    argv = [sys.executable, str(script), *map(str, knockout_argv(tiny_gpt2_dir, facts_file, out, "--resume"))]
    kill_after_shards(argv, run_dir, 2, env=subprocess_env(tmp_path / "killed.log", 0.5), cwd=tmp_path,
                      timeout_s=180)
    assert not out.exists()
    manifest = manifest_of(run_dir)
    assert manifest["kind"] == "recall-knockout" and manifest["plan"]["unit_name"] == "facts"
    done = [s["shard"] for s in manifest["shards"] if s["status"] == "done"]
    assert len(manifest["shards"]) == len(FACTS) and 2 <= len(done) < len(FACTS)  # one fact per shard
    unfinished = [u for s in manifest["shards"] if s["status"] != "done" for u in range(*s["units"])]

    resumed_log = tmp_path / "resumed.log"
    proc = subprocess.run(argv, cwd=tmp_path, env=subprocess_env(resumed_log), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(u for _, u in logged_units(resumed_log)) == unfinished  # nothing finished is redone
    assert f"computed {len(unfinished)}, reused {len(done)} finished shard(s)" in proc.stdout, proc.stdout
    assert not run_dir.exists()

    whole = tmp_path / "whole.parquet"
    plain = [sys.executable, str(script), *map(str, knockout_argv(tiny_gpt2_dir, facts_file, whole))]
    proc = subprocess.run(plain, cwd=tmp_path, env=subprocess_env(tmp_path / "whole.log"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(logged_units(tmp_path / "whole.log")) == len(FACTS)
    assert out.read_bytes() == whole.read_bytes()
    assert not (tmp_path / "whole.parquet.ckpt").exists()


class Interrupted(Exception):
    """Stands for whatever stops a run (not a fflayers error, so the CLI does not catch it)."""


@pytest.fixture
def blocks(monkeypatch):
    """One fact per block; ``blocks.stop_after`` (blocks computed, then :class:`Interrupted`) and the log
    ``blocks.units`` of the blocks computed."""
    for name in list(recall_analyses.FACTS_PER_UNIT):
        monkeypatch.setitem(recall_analyses.FACTS_PER_UNIT, name, 1)
    compute = tables.FactBlocks.run_units

    class Blocks:
        stop_after: int | None = None
        units: list[int] = []

    def run_units(self, units, progress):
        if Blocks.stop_after is not None and len(Blocks.units) >= Blocks.stop_after:
            raise Interrupted
        Blocks.units.extend(units)
        return compute(self, units, progress)

    monkeypatch.setattr(tables.FactBlocks, "run_units", run_units)
    Blocks.units = []
    return Blocks


def table_argv(command, model, facts, paragraphs, out):
    argv = [command, "--hf_model", model, "--device", "cpu", "--quiet", "--facts", facts, "--output", out]
    if command in ("enrichment", "sublayer-knockout"):
        argv += ["--paragraphs", paragraphs, "--top", 100, "--keep", 20]
    if command == "sublayer-knockout":
        argv += ["--window", 0, "--kinds", "mlp"]
    if command == "knockout":
        argv += ["--window", 1]
    return argv


@pytest.mark.parametrize("command, suffix", [("knockout", ".parquet"), ("project", ".csv"),
                                             ("extraction", ".parquet"), ("enrichment", ".jsonl"),
                                             ("sublayer-knockout", ".parquet")])
def test_interrupted_run_resumes_to_the_same_bytes(command, suffix, tiny_gpt2_dir, facts_file,
                                                   paragraphs_file, tmp_path, capsys, blocks):
    whole, out = tmp_path / f"whole{suffix}", tmp_path / f"t{suffix}"
    assert run_cli(table_argv(command, tiny_gpt2_dir, facts_file, paragraphs_file, whole), capsys)[0] == 0
    argv = [*table_argv(command, tiny_gpt2_dir, facts_file, paragraphs_file, out), "--resume"]
    blocks.units, blocks.stop_after = [], 3
    with pytest.raises(Interrupted):
        dr.main([str(a) for a in argv])
    manifest = manifest_of(Path(f"{out}.ckpt"))
    assert manifest["kind"] == f"recall-{command}"
    assert [s["status"] for s in manifest["shards"]].count("done") == 3 and not out.exists()
    blocks.units, blocks.stop_after = [], None
    rc, stdout, err = run_cli(argv, capsys)
    assert rc == 0, err
    assert blocks.units == list(range(3, len(FACTS))) and "computed 5, reused 3" in stdout
    assert out.read_bytes() == whole.read_bytes() and not Path(f"{out}.ckpt").exists()


def test_without_resume_nothing_is_left_behind(tiny_gpt2_dir, facts_file, tmp_path, capsys, blocks):
    out = tmp_path / "k.parquet"
    blocks.stop_after = 2
    with pytest.raises(Interrupted):
        dr.main([str(a) for a in knockout_argv(tiny_gpt2_dir, facts_file, out)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["facts.json"]
    rc, _, err = run_cli(knockout_argv(tiny_gpt2_dir, tmp_path / "none.json", out, "--resume"), capsys)
    assert rc == 2 and "does not exist" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["facts.json"]


def interrupted_folder(argv, blocks) -> Path:
    blocks.units, blocks.stop_after = [], 2
    with pytest.raises(Interrupted):
        dr.main([str(a) for a in argv])
    blocks.stop_after = None
    run_dir = Path(str(argv[argv.index("--output") + 1]) + ".ckpt")
    assert manifest_of(run_dir) is not None
    return run_dir


def refusal(argv, capsys) -> str:
    rc, stdout, err = run_cli(argv, capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    return err


def test_other_options_or_inputs_are_refused(tiny_gpt2_dir, facts_file, paragraphs_file, tmp_path, capsys,
                                             blocks):
    out = tmp_path / "k.parquet"
    argv = [*knockout_argv(tiny_gpt2_dir, facts_file, out, "--resume")]
    run_dir = interrupted_folder(argv, blocks)
    before = manifest_of(run_dir)

    err = refusal([*argv, "--sets", "subject"], capsys)
    assert "(differs in: sets)" in err and '["subject"] here' in err
    err = refusal([*argv, "--window", 2], capsys)
    assert "(differs in: window); window is 2 here, 1 in the run folder" in err
    moved = tmp_path / "moved.json"  # the same content elsewhere is the same input
    moved.write_text(facts_file.read_text())
    facts_file.write_text(json.dumps([{**FACTS[0], "prompt": "The capital city of Norway is"}, *FACTS[1:]]))
    err = refusal(argv, capsys)
    assert "(differs in: facts)" in err
    assert manifest_of(run_dir) == before and not out.exists()  # a refusal changes nothing
    rc, stdout, err = run_cli(knockout_argv(tiny_gpt2_dir, moved, out, "--resume"), capsys)
    assert rc == 0 and "computed 6, reused 2" in stdout, err

    out = tmp_path / "e.parquet"
    argv = table_argv("enrichment", tiny_gpt2_dir, moved, paragraphs_file, out) + ["--resume"]
    interrupted_folder(argv, blocks)
    paragraphs_file.write_text(paragraphs_file.read_text() + "Japan and Tokyo.\n")
    err = refusal(argv, capsys)
    assert "(differs in: paragraphs)" in err
    err = refusal([*argv, "--no_baseline"], capsys)
    assert "(differs in: no_baseline, paragraphs)" in err


def test_a_run_folder_of_another_analysis_is_refused(tiny_gpt2_dir, facts_file, tmp_path, capsys, blocks):
    from fflayers.runs import Manifest, config_hash, make_plan

    out = tmp_path / "t.parquet"
    interrupted_folder(knockout_argv(tiny_gpt2_dir, facts_file, out, "--resume"), blocks)
    err = refusal(["project", "--hf_model", tiny_gpt2_dir, "--device", "cpu", "--quiet", "--facts",
                   facts_file, "--output", out, "--resume"], capsys)
    assert "holds a run of recall-knockout, not of recall-project" in err

    other = tmp_path / "ffn.parquet"  # a corpus scan's folder under the same output name
    Manifest(f"{other}.ckpt").open("ffn_info", {"mode": "layer"}, config_hash({"mode": "layer"}),
                                   lambda: make_plan([10, 10], 1, unit_name="sentences"))
    err = refusal(knockout_argv(tiny_gpt2_dir, facts_file, other, "--resume"), capsys)
    assert "holds a run of ffn_info, not of recall-knockout" in err
    assert not other.exists() and manifest_of(Path(f"{other}.ckpt"))["kind"] == "ffn_info"


def test_merge_of_blocks_is_registered_and_order_free():
    import pandas as pd

    from fflayers.runs import merge_function, merge_piece_states

    parts = [{"pieces": [[u, pd.DataFrame({"known_id": [u], "x": [float(u)]})]]} for u in range(4)]
    merge = merge_function("recall-knockout")
    one = merge([merge(parts[2:]), merge(parts[:2])])
    other = merge([parts[3], merge([parts[1], parts[0]]), parts[2]])
    assert [u for u, _ in one["pieces"]] == [u for u, _ in other["pieces"]] == [0, 1, 2, 3]
    assert tables.blocks_table(one)["known_id"].tolist() == [0, 1, 2, 3]
    assert all(merge_function(f"recall-{name}") is merge_piece_states
               for name in ("project", "extraction", "enrichment", "sublayer-knockout"))
    with pytest.raises(ValueError, match="unit 1 was added twice"):
        merge([parts[1], parts[1]])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(tiny_gpt2_dir, facts_file, tmp_path):
    script = wrapper(tmp_path)
    one, two = tmp_path / "one.parquet", tmp_path / "two.parquet"
    plain = [sys.executable, str(script), *map(str, knockout_argv(tiny_gpt2_dir, facts_file, one))]
    proc = subprocess.run(plain, cwd=tmp_path, env=subprocess_env(tmp_path / "one.log"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    argv = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(free_port()), str(script),
            *map(str, knockout_argv(tiny_gpt2_dir, facts_file, two, "--resume"))]
    proc = subprocess.run(argv, cwd=tmp_path, env=subprocess_env(tmp_path / "two.log"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n = len(FACTS)
    assert f"{n} shard(s) of {n} facts on 2 ranks; computed {n}, reused 0" in proc.stdout, proc.stdout
    assert proc.stdout.count("rows ->") == 1  # rank 0 writes
    units = logged_units(tmp_path / "two.log")
    by_rank = {r: sorted(u for q, u in units if q == r) for r in (0, 1)}
    assert by_rank == {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}
    assert two.read_bytes() == one.read_bytes()
    assert not (tmp_path / "two.parquet.ckpt").exists()
