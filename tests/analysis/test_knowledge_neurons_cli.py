"""analysis/knowledge_neurons.py on a tiny GPT-2 with the real BPE: outputs, agreement with KnowledgeNeurons,
--resume after an interruption, a 2-process torchrun run equal to one process (bytes), and one-line errors.
SIGKILL, refused resumes and leftovers: test_neurons_runs.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis import knowledge_neurons as cli
from fflayers.backends.hf import load_hf_lm
from fflayers.neurons import evaluate
from fflayers.neurons.facts import ParaphraseFact, write_facts

ROOT = Path(__file__).resolve().parents[2]
FACTS = [
    ParaphraseFact("c-fr", "capital", ("The capital of France is", "France's capital is"), "Paris"),
    ParaphraseFact("c-de", "capital", ("The capital of Germany is", "Germany's capital is"), "Berlin"),
    ParaphraseFact("l-fr", "language", ("In France people speak", "The language of France is"), "French"),
]
SETTINGS = ["--steps", "2", "--batch_size", "16", "--p", "0.4", "--adaptive_threshold", "0.2", "--quiet",
            "--device", "cpu"]
OUTPUTS = ("results.json", "results.tsv", "results_summary.tsv", "results.png", "results.pdf")


@pytest.fixture
def facts_file(tmp_path) -> Path:
    path = tmp_path / "facts.jsonl"
    write_facts(path, FACTS)
    return path


def run_cli(model, facts_file, out, *extra) -> int:
    return cli.main(["--hf_model", str(model), "--facts", str(facts_file), "--output", str(out),
                     *SETTINGS, *extra])


def test_outputs_and_neurons(tiny_gpt2_dir, facts_file, tmp_path, capsys):
    out = tmp_path / "kn" / "results.json"
    out.parent.mkdir()
    assert run_cli(tiny_gpt2_dir, facts_file, out) == 0
    printed = capsys.readouterr().out
    assert "capital" in printed and "language" in printed
    # the outputs and nothing else: no run folder, no partial files
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([*OUTPUTS, "results.meta.json"])
    result = json.loads(out.read_text())
    assert set(result["summary"]) == {"capital", "language", "all"}
    assert result["summary"]["capital"]["n_facts"] == 2
    # the neurons are KnowledgeNeurons' refined neurons with the same settings
    from fflayers.neurons import KnowledgeNeurons

    adapter = load_hf_lm(str(tiny_gpt2_dir), device="cpu")
    kn = KnowledgeNeurons(adapter)
    for fact, saved in zip(FACTS, result["facts"], strict=True):
        want = kn.get_refined_neurons(list(fact.prompts), fact.answer, p=0.4, steps=2, batch_size=16,
                                      coarse_adaptive_threshold=0.2, quiet=True)
        assert saved["uuid"] == fact.uuid and saved["neurons"] == want
    table = pd.read_csv(out.parent / "results.tsv", sep="\t")
    assert set(table["intervention"]) == {"suppress", "enhance"}
    assert set(table["uuid"]) == {f.uuid for f in FACTS}


def output_bytes(out: Path) -> dict[str, bytes]:
    """The output files of the run writing ``out`` (``.meta.json`` aside: it names the output path)."""
    stem = out.with_suffix("")
    paths = [out, stem.with_suffix(".tsv"), Path(f"{stem}_summary.tsv"), stem.with_suffix(".png"),
             stem.with_suffix(".pdf")]
    return {p.name.replace(stem.name, "results"): p.read_bytes() for p in paths}


class Crash(Exception):
    """A failure in the middle of a run (not an error of the input)."""


def test_interrupted_run_resumes(tiny_gpt2_dir, facts_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")  # no creation date in the PDF
    full = tmp_path / "full.json"
    assert run_cli(tiny_gpt2_dir, facts_file, full) == 0
    out = tmp_path / "resumed.json"
    run_dir = Path(f"{out}.ckpt")
    original = evaluate.evaluate_fact
    calls: list[str] = []
    interrupt = [True]

    def failing(adapter, fact, *args, **kwargs):
        calls.append(fact.uuid)
        if len(calls) == 2 and interrupt:
            interrupt.pop()
            raise Crash
        return original(adapter, fact, *args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_fact", failing)
    with pytest.raises(Crash):
        run_cli(tiny_gpt2_dir, facts_file, out, "--resume")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert not out.exists() and [s["status"] for s in manifest["shards"]] == ["done", "running", "pending"]
    calls.clear()
    assert run_cli(tiny_gpt2_dir, facts_file, out, "--resume") == 0
    assert calls == ["c-de", "l-fr"] and "computed 2, reused 1" in capsys.readouterr().out
    assert output_bytes(out) == output_bytes(full)
    assert not run_dir.exists()


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tiny_gpt2_dir, facts_file, tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")  # no creation date in the PDF, here and in the ranks

    one = tmp_path / "one.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank (OMP_NUM_THREADS=1): the thread count moves float sums
    try:
        assert run_cli(tiny_gpt2_dir, facts_file, one) == 0
    finally:
        torch.set_num_threads(threads)
    two = tmp_path / "two.json"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2",
           str(ROOT / "analysis" / "knowledge_neurons.py"),
           "--hf_model", str(tiny_gpt2_dir), "--facts", str(facts_file), "--output", str(two), *SETTINGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert output_bytes(two) == output_bytes(one)
    names = ["two.json", "two.meta.json", "two.pdf", "two.png", "two.tsv", "two_summary.tsv"]
    assert sorted(p.name for p in tmp_path.glob("two*")) == names  # no run folder, no partial files


@pytest.mark.parametrize("content,flags,words", [
    ("", [], "holds no facts"),
    (None, [], "does not exist"),
    ("ok", ["--layers", "7"], "out of range"),
    ("ok", ["--p", "1.5"], "--p"),
    ("ok", ["--steps", "0"], "--steps"),
    ("ok", ["--relations", "population"], "--relations population"),
])
def test_bad_input_one_line(tiny_gpt2_dir, tmp_path, capsys, content, flags, words):
    path = tmp_path / "facts.jsonl"
    if content == "ok":
        write_facts(path, FACTS)
    elif content is not None:
        path.write_text(content)
    assert run_cli(tiny_gpt2_dir, path, tmp_path / "r.json", *flags) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and err.startswith("knowledge_neurons.py: error:")


def test_output_must_be_json(tiny_gpt2_dir, facts_file, tmp_path, capsys):
    assert run_cli(tiny_gpt2_dir, facts_file, tmp_path / "r.tsv") == 2
    assert ".json" in capsys.readouterr().err
