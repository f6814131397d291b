"""analysis/knowledge_neurons.py on a tiny GPT-2 with the real BPE: outputs, agreement with KnowledgeNeurons,
--resume after an interruption, a 2-process torchrun run equal to one process, and one-line errors."""

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


@pytest.fixture
def facts_file(tmp_path) -> Path:
    path = tmp_path / "facts.jsonl"
    write_facts(path, FACTS)
    return path


def run_cli(model, facts_file, out, *extra) -> int:
    return cli.main(["--hf_model", str(model), "--facts", str(facts_file), "--output", str(out), *SETTINGS, *extra])


def test_outputs_and_neurons(tiny_gpt2_dir, facts_file, tmp_path, capsys):
    out = tmp_path / "kn" / "results.json"
    out.parent.mkdir()
    assert run_cli(tiny_gpt2_dir, facts_file, out) == 0
    printed = capsys.readouterr().out
    assert "capital" in printed and "language" in printed
    for name in ("results.json", "results.tsv", "results_summary.tsv", "results.png", "results.pdf",
                 "results.meta.json"):
        assert (out.parent / name).is_file(), name
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


def test_interrupted_run_resumes(tiny_gpt2_dir, facts_file, tmp_path, monkeypatch, capsys):
    full = tmp_path / "full.json"
    assert run_cli(tiny_gpt2_dir, facts_file, full) == 0
    out = tmp_path / "resumed.json"
    original = evaluate.evaluate_fact
    calls: list[str] = []
    interrupt = [True]

    def failing(adapter, fact, *args, **kwargs):
        calls.append(fact.uuid)
        if len(calls) == 2 and interrupt:
            interrupt.pop()
            raise KeyboardInterrupt
        return original(adapter, fact, *args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_fact", failing)
    with pytest.raises(KeyboardInterrupt):
        run_cli(tiny_gpt2_dir, facts_file, out)
    assert not out.exists() and len(list(out.with_suffix(".parts").glob("*.json"))) == 1
    calls.clear()
    assert run_cli(tiny_gpt2_dir, facts_file, out, "--resume") == 0
    assert calls == ["c-de", "l-fr"] and "resuming: 1 of 3" in capsys.readouterr().out
    a, b = json.loads(full.read_text()), json.loads(out.read_text())
    assert a["facts"] == b["facts"] and a["summary"] == b["summary"]
    # parts of other settings are refused
    assert run_cli(tiny_gpt2_dir, facts_file, out, "--resume", "--seed", "3") == 2
    assert "rerun without --resume" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tiny_gpt2_dir, facts_file, tmp_path):
    import torch

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
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(ROOT / "analysis" / "knowledge_neurons.py"),
           "--hf_model", str(tiny_gpt2_dir), "--facts", str(facts_file), "--output", str(two), *SETTINGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["facts"] == b["facts"]
    ta, tb = (pd.read_csv(p.with_suffix(".tsv"), sep="\t") for p in (one, two))
    pd.testing.assert_frame_equal(ta, tb, rtol=1e-6)


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
