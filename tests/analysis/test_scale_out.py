"""Scaled-out corpus scans on the tiny fairseq LM: 2-rank torchrun runs (gloo, CPU), job arrays (--shard I/N +
merge_shards.py) and a rank killed with SIGKILL then resumed, each compared with a one-process run (the peer):
trigger JSONL, layer and dim tables and the agreement TSV must be identical. One thread per process everywhere
(torchrun's default), since float results of matrix products can differ in the last bit with the thread
count."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import generate_outputs as go
from analysis import key_value_agreement as kva
from analysis import merge_shards
from analysis import trigger_examples_jsonl_to_textual as to_textual

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).parent / "torchrun"

WRAPPER = """
import json, os, signal, sys
sys.path.insert(0, {repo!r})
import fflayers.distributed as fd
from analysis import generate_outputs as go, key_value_agreement as kva
if os.environ.get("KILL_RANK_AFTER_FIRST_SHARD"):
    from fflayers.runs.manifest import Manifest
    update = Manifest.update
    def killing_update(self, shard, **fields):
        update(self, shard, **fields)
        if fields.get("status") == "done" and os.environ["RANK"] == os.environ["KILL_RANK_AFTER_FIRST_SHARD"]:
            os.kill(os.getpid(), signal.SIGKILL)
    Manifest.update = killing_update
if os.environ.get("COUNT_TOKENS"):  # print the tokens this rank mined, at exit
    import atexit
    import importlib
    te = importlib.import_module("fflayers.memories.trigger_examples")
    run_units, seen = te.TriggerScan.run_units, [0]
    def counting(self, units, progress=None):
        seen[0] += sum(len(self.sentences[i]) for u in units for i in self.batches[u])
        return run_units(self, units, progress)
    te.TriggerScan.run_units = counting
    atexit.register(lambda: print(f"rank {{os.environ['RANK']}} tokens {{seen[0]}}", flush=True))
finish, fd.finish = fd.finish, lambda: None  # one process group for all the runs below
rc = 0
for prog, argv in json.loads(sys.argv[1]):
    rc |= (go if prog == "go" else kva).main(argv)
finish()
sys.exit(rc)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp: Path, runs: list, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    script = tmp / "wrapper.py"
    script.write_text(WRAPPER.format(repo=str(REPO)))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **(env_extra or {}))
    argv = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(free_port()), str(script),
            json.dumps([[p, [str(a) for a in args]] for p, args in runs])]
    return subprocess.run(argv, capture_output=True, text=True, cwd=tmp, env=env, timeout=300)


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lm(fairseq_adaptive_lm):
    return fairseq_adaptive_lm


def base_args(lm, out: Path, kind: str) -> list:
    args = ["--data_file", lm.train, "--model_dir", lm.model_dir, "--max_sentences", 200, "--device", "cpu",
            "--batch_tokens", 256, "--quiet", "--output_file", out]
    if kind == "trigger":
        return [*args, "--get_trigger_examples", "--top_k_trigger_examples", 4]
    return [*args, "--extract_ffn_info", "--extract_mode", kind]


def run_go(argv) -> int:
    return go.main([str(a) for a in argv])


def assert_same_table(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns) and len(a) == len(b) > 0
    for col in a.columns:
        x, y = a[col].to_numpy(), b[col].to_numpy()
        if x.dtype == object and isinstance(x[0], np.ndarray):
            x, y = np.stack(x), np.stack(y)
        assert x.dtype == y.dtype and np.array_equal(x, y), col


def test_torchrun_two_ranks_equal_one_process(lm, tmp_path, one_thread, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    names = {"trigger": "top.jsonl", "layer": "layer.pkl", "dim": "dim.pkl"}
    for kind, name in names.items():
        assert run_go(base_args(lm, one / name, kind)) == 0
    assert to_textual.main(["--input_file", str(one / "top.jsonl"), "--model_dir", str(lm.model_dir),
                            "--output_dir", str(tmp_path / "txt"), "--quiet"]) == 0
    kva_args = ["--model_dir", lm.model_dir, "--data_dir", tmp_path / "txt", "--device", "cpu",
                "--chunk_values", 40, "--random_baseline", "--quiet"]
    assert kva.main([str(a) for a in [*kva_args, "--output_base", one / "kv"]]) == 0
    capsys.readouterr()

    runs = [("go", base_args(lm, two / name, kind)) for kind, name in names.items()]
    runs.append(("kva", [*kva_args, "--output_base", two / "kv"]))
    proc = torchrun(tmp_path, runs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 ranks" in proc.stdout
    # both ranks computed shards of every scan: the plan has 4 shards per worker
    assert proc.stdout.count("8 shards") == 1 and "computed 8, reused 0" in proc.stdout, proc.stdout

    assert (two / "top.jsonl").read_bytes() == (one / "top.jsonl").read_bytes()
    for kind in ("layer", "dim"):
        assert_same_table(pd.read_pickle(two / names[kind]), pd.read_pickle(one / names[kind]))
    for name in ("kv.tsv", "kv_random.tsv", "kv_max_probs.json"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    assert not list(two.glob("*.ckpt")) and not list(two.glob("*.shard-*"))


def test_every_rank_gets_work_on_a_few_hundred_sentences(lm, tmp_path, one_thread, capsys):
    """200 short sentences at the default batch size (one batch of 4,096 tokens would hold them all): the plan
    still splits them so that both ranks mine tokens, and the output equals one process."""
    def args(out: Path) -> list:
        return ["--data_file", lm.train, "--model_dir", lm.model_dir, "--max_sentences", 200,
                "--device", "cpu", "--quiet", "--output_file", out, "--get_trigger_examples",
                "--top_k_trigger_examples", 4]

    assert run_go(args(tmp_path / "one.jsonl")) == 0
    proc = torchrun(tmp_path, [("go", args(tmp_path / "two.jsonl"))], {"COUNT_TOKENS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokens = {int(m[0]): int(m[1]) for m in re.findall(r"rank (\d) tokens (\d+)", proc.stdout)}
    print("tokens mined per rank:", tokens)
    assert set(tokens) == {0, 1} and min(tokens.values()) > 0, proc.stdout
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()


@pytest.mark.parametrize("kind", ["trigger", "layer"])
def test_job_array_shards_merge_to_single_run(kind, lm, tmp_path, capsys):
    name = "top.jsonl" if kind == "trigger" else "layer.pkl"
    single, out = tmp_path / f"single_{name}", tmp_path / name
    assert run_go(base_args(lm, single, kind)) == 0
    for i in range(3):
        assert run_go([*base_args(lm, out, kind), "--shard", f"{i}/3"]) == 0
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.glob(f"{name}.shard-*")) == [f"{name}.shard-{i}-of-3.pt"
                                                                        for i in range(3)]
    manifest = json.loads((tmp_path / f"{name}.ckpt" / "manifest.json").read_text())
    assert manifest["left"] == {"shards": 0, "sentences": 0}
    assert merge_shards.main(["--output_file", str(out)]) == 0
    if kind == "trigger":
        assert out.read_bytes() == single.read_bytes()
    else:
        assert_same_table(pd.read_pickle(out), pd.read_pickle(single))
    assert json.loads(Path(f"{out}.meta.json").read_text())["config"]["jobs"] == 3
    assert not list(tmp_path.glob(f"{name}.shard-*")) and not (tmp_path / f"{name}.ckpt").exists()


def test_job_array_of_torchrun_jobs_merges_to_single_run(lm, tmp_path, one_thread, capsys):
    """Two jobs (--shard I/2) of two torchrun ranks each: four workers over one plan; the partials merge into
    the single run's output."""
    names = {"trigger": "top.jsonl", "layer": "layer.pkl"}
    for kind, name in names.items():
        assert run_go(base_args(lm, tmp_path / f"single_{name}", kind)) == 0
    runs = [("go", [*base_args(lm, tmp_path / name, kind), "--shard", f"{i}/2"])
            for kind, name in names.items()
            for i in range(2)]
    proc = torchrun(tmp_path, runs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (proc.stdout.count("2 ranks, job 0 of 2") == 2
            and proc.stdout.count("2 ranks, job 1 of 2") == 2), proc.stdout
    capsys.readouterr()
    for kind, name in names.items():
        out = tmp_path / name
        manifest = json.loads((tmp_path / f"{name}.ckpt" / "manifest.json").read_text())
        n_shards = manifest["plan"]["n_shards"]
        assert manifest["plan"]["workers"] == 4 and manifest["left"] == {"shards": 0, "sentences": 0}
        # trigger: 4 per worker (200 sentences split into enough batches); layer: 4 blocks of >= 64 sentences
        assert n_shards == (16 if kind == "trigger" else 4)
        # worker w = 2 job + rank takes a contiguous quarter of the shards (the first ones one more): job 0
        # the first two quarters
        quarters = [n_shards // 4 + (w < n_shards % 4) for w in range(4)]
        shards = [torch.load(tmp_path / f"{name}.shard-{i}-of-2.pt", weights_only=False)["shards"]
                  for i in range(2)]
        split = quarters[0] + quarters[1]
        assert shards == [list(range(split)), list(range(split, n_shards))]
        assert not out.exists()
        assert merge_shards.main(["--output_file", str(out)]) == 0
        if kind == "trigger":
            assert out.read_bytes() == (tmp_path / f"single_{name}").read_bytes()
        else:
            assert_same_table(pd.read_pickle(out), pd.read_pickle(tmp_path / f"single_{name}"))
        assert not list(tmp_path.glob(f"{name}.shard-*")) and not (tmp_path / f"{name}.ckpt").exists()


@pytest.mark.parametrize("kind", ["trigger", "layer"])
def test_killed_rank_then_resume_with_another_world_size(kind, lm, tmp_path, one_thread, capsys, monkeypatch):
    name = "top.jsonl" if kind == "trigger" else "layer.pkl"
    single, out, run_dir = tmp_path / f"single_{name}", tmp_path / name, tmp_path / f"{name}.ckpt"
    assert run_go(base_args(lm, single, kind)) == 0
    # rank 0 holds the first half of the shards (the larger one), and dies after the first of them
    proc = torchrun(tmp_path, [("go", [*base_args(lm, out, kind), "--resume"])],
                    {"KILL_RANK_AFTER_FIRST_SHARD": "0"})
    assert proc.returncode != 0 and not out.exists()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    status = [s["status"] for s in manifest["shards"]]
    n_shards, n_done = len(status), status.count("done")
    assert n_shards == (8 if kind == "trigger" else 4)  # layer: 200 sentences make 4 blocks of >= 64
    assert status[0] == "done" and status[1] != "done" and 1 <= n_done < n_shards, status
    assert manifest["left"]["shards"] == n_shards - n_done
    assert manifest["left"]["sentences"] == sum(s["sentences"] for s in manifest["shards"]
                                                if s["status"] != "done")

    # a rerun of another configuration into the same run folder is refused, and changes nothing
    capsys.readouterr()
    other = [*base_args(lm, out, "dim" if kind == "layer" else kind), "--resume"]
    if kind == "trigger":
        other += ["--top_k_trigger_examples", 3]
    assert run_go(other) == 2
    assert ("another configuration (differs in: " + ("mode" if kind == "layer" else "k")
            in one_line_error(capsys, "generate_outputs.py"))
    assert json.loads((run_dir / "manifest.json").read_text()) == manifest

    # the resume computes the unfinished shards' units only (recorded), in one process: the stored plan is
    # kept
    from fflayers.memories.ffn_info import FfnInfoScan
    from fflayers.memories.trigger_examples import TriggerScan

    scan_cls = TriggerScan if kind == "trigger" else FfnInfoScan
    units: list[int] = []
    run_units = scan_cls.run_units
    monkeypatch.setattr(scan_cls, "run_units",
                        lambda self, r, progress=None: units.extend(r) or run_units(self, r, progress))
    assert run_go([*base_args(lm, out, kind), "--resume"]) == 0
    assert f"computed {n_shards - n_done}, reused {n_done} finished shard(s)" in capsys.readouterr().out
    pending = [u for s in manifest["shards"] if s["status"] != "done" for u in range(*s["units"])]
    assert sorted(units) == pending
    if kind == "trigger":
        assert out.read_bytes() == single.read_bytes()
    else:
        assert_same_table(pd.read_pickle(out), pd.read_pickle(single))
    assert not run_dir.exists()


# ----- bad input --------------------------------------------------------------------------------------------


def one_line_error(capsys, prog: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error:"), err
    return err[0]


@pytest.mark.parametrize("spec", ["3/2", "0/0", "2/2", "a/b", "1"])
def test_bad_shard_spec(spec, lm, tmp_path, capsys):
    out = tmp_path / "top.jsonl"
    assert run_go([*base_args(lm, out, "trigger"), "--shard", spec]) == 2
    assert "shard spec" in one_line_error(capsys, "generate_outputs.py")
    assert not list(tmp_path.iterdir())


def test_partials_of_different_configurations_are_refused(lm, tmp_path, capsys):
    out = tmp_path / "top.jsonl"
    assert run_go([*base_args(lm, out, "trigger"), "--shard", "0/2"]) == 0
    # a rerun into the same run folder with another k is refused: results are never mixed
    assert run_go([*base_args(lm, out, "trigger"), "--shard", "1/2", "--top_k_trigger_examples", 3]) == 2
    assert "another configuration (differs in: k)" in one_line_error(capsys, "generate_outputs.py")
    other = tmp_path / "other.jsonl"
    assert run_go([*base_args(lm, other, "trigger"), "--shard", "1/2", "--top_k_trigger_examples", 3]) == 0
    capsys.readouterr()
    parts = [tmp_path / "top.jsonl.shard-0-of-2.pt", tmp_path / "other.jsonl.shard-1-of-2.pt"]
    assert merge_shards.main(["--output_file", str(out), "--partials", *map(str, parts)]) == 2
    assert "different configurations (differ in: k)" in one_line_error(capsys, "merge_shards.py")
    assert merge_shards.main(["--output_file", str(out)]) == 2  # job 1 of 2 missing
    assert "missing: [1]" in one_line_error(capsys, "merge_shards.py")
    assert not out.exists()


def test_no_gpu_for_a_rank(lm, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    out = tmp_path / "top.jsonl"
    args = [a if a != "cpu" else "cuda" for a in base_args(lm, out, "trigger")]
    assert run_go(args) == 2
    assert "only 1 GPU(s) are visible" in one_line_error(capsys, "generate_outputs.py")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert run_go(args) == 2
    assert "no CUDA device" in one_line_error(capsys, "generate_outputs.py")


# ----- merge_shards.py for any analysis ------------------------------------------------------------------


def test_partials_of_different_analyses_are_refused(lm, tmp_path, capsys):
    top, layer = tmp_path / "top.jsonl", tmp_path / "layer.pkl"
    assert run_go([*base_args(lm, top, "trigger"), "--shard", "0/2"]) == 0
    assert run_go([*base_args(lm, layer, "layer"), "--shard", "1/2"]) == 0
    capsys.readouterr()
    parts = [tmp_path / "top.jsonl.shard-0-of-2.pt", tmp_path / "layer.pkl.shard-1-of-2.pt"]
    assert merge_shards.main(["--output_file", str(top), "--partials", *map(str, parts)]) == 2
    line = one_line_error(capsys, "merge_shards.py")
    assert "are of different analyses (trigger_examples, ffn_info)" in line, line
    assert not top.exists() and all(p.is_file() for p in parts)


def test_merge_writes_any_analysis_through_its_registered_writer(tmp_path, capsys):
    """A toy analysis on fflayers.runs: its partials merge with the merge registered for its kind, and the
    output is written by the writer registered with it; a partial naming a module outside fflayers is
    refused."""
    from fflayers.runs import Workers, partial_header, partial_path, register_merge, run_units, write_partial
    from tests.runs.test_partials import merge_toy_states
    from tests.runs.toy import KIND, ToyConfig, ToyTask, expected

    def write_toy(output, merged):
        torch.save({"total": merged.state["total"], "count": merged.state["count"]}, output)

    register_merge(KIND, merge_toy_states, write_toy)
    config, output = ToyConfig(units=7), tmp_path / "toy.pt"
    for job in range(2):
        run = run_units(ToyTask(config), config, kind=KIND, run_dir=f"{output}.ckpt", workers=Workers(job, 2),
                        shard_weight=1, progress=False)
        write_partial(partial_path(output, job, 2), partial_header(run, module="tests.runs.toy"),
                      run.result.state_dict())
    assert merge_shards.main(["--output_file", str(output), "--keep"]) == 2  # not a module of fflayers
    assert "names the module 'tests.runs.toy', which is not a module of fflayers" in one_line_error(
        capsys, "merge_shards.py")
    assert not output.exists()
    for job in range(2):  # a partial that names a module of fflayers (this kind is registered in-process)
        path = partial_path(output, job, 2)
        part = torch.load(path, weights_only=False)
        part["module"] = "fflayers.runs"
        torch.save(part, path)
    assert merge_shards.main(["--output_file", str(output)]) == 0
    merged, want = torch.load(output, weights_only=True), expected(config)
    assert merged["count"] == 7 and torch.equal(merged["total"], want.total)
    assert not list(tmp_path.glob("toy.pt.shard-*")) and not (tmp_path / "toy.pt.ckpt").exists()
