"""knowledge_neurons.py on fflayers.runs: a run killed with SIGKILL and resumed gives the bytes of an
uninterrupted run and computes only the unfinished facts; a resume with another option, another content of
the facts file or a run folder of another analysis is refused in one line; without --resume nothing but the
outputs is left, also after an error."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from analysis import knowledge_neurons as cli
from fflayers.core import InputError
from fflayers.neurons import evaluate
from fflayers.neurons.facts import ParaphraseFact, write_facts
from fflayers.runs import Manifest, config_hash, make_plan
from tests.runs.killing import kill_after_shards

ROOT = Path(__file__).resolve().parents[2]
COUNTRIES = [("France", "Paris", "French"), ("Germany", "Berlin", "German"), ("Italy", "Rome", "Italian"),
             ("Spain", "Madrid", "Spanish")]
FACTS = [fact for country, capital, language in COUNTRIES for fact in (
    ParaphraseFact(f"cap-{country}", "capital", (f"The capital of {country} is", f"{country}'s capital is"),
                   capital),
    ParaphraseFact(f"lang-{country}", "language", (f"In {country} people speak",
                                                   f"The language of {country} is"), language))]
SETTINGS = ["--steps", "4", "--batch_size", "16", "--p", "0.4", "--adaptive_threshold", "0.2", "--quiet",
            "--device", "cpu"]


@pytest.fixture
def facts_file(tmp_path) -> Path:
    path = tmp_path / "facts.jsonl"
    write_facts(path, FACTS)
    return path


@pytest.fixture
def one_thread(monkeypatch):
    """One thread and no PDF creation date, as in the subprocesses (float sums move with the thread count)."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def argv(model, facts_file, out, *extra) -> list[str]:
    return ["--hf_model", str(model), "--facts", str(facts_file), "--output", str(out), *SETTINGS, *extra]


def output_bytes(out: Path) -> dict[str, bytes]:
    """The outputs of the run writing ``out`` (``.meta.json`` aside: it names the output path)."""
    stem = out.with_suffix("")
    paths = [out, stem.with_suffix(".tsv"), Path(f"{stem}_summary.tsv"), stem.with_suffix(".png"),
             stem.with_suffix(".pdf")]
    return {p.name.replace(stem.name, "results"): p.read_bytes() for p in paths}


def done_shards(manifest: Path) -> list[dict]:
    """The finished shards of a run folder's manifest (none while it is missing or being replaced)."""
    try:
        return [s for s in json.loads(manifest.read_text())["shards"] if s["status"] == "done"]
    except (OSError, ValueError, KeyError):
        return []


def test_sigkill_then_resume_computes_only_unfinished_facts(tiny_gpt2_dir, facts_file, tmp_path, one_thread,
                                                             monkeypatch, capsys):
    full = tmp_path / "full.json"
    assert cli.main(argv(tiny_gpt2_dir, facts_file, full)) == 0
    out = tmp_path / "killed.json"
    manifest = Path(f"{out}.ckpt") / "manifest.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", SOURCE_DATE_EPOCH="0",
               PYTHONPATH=str(ROOT))
    script = str(ROOT / "analysis" / "knowledge_neurons.py")
    kill_after_shards([sys.executable, script, *argv(tiny_gpt2_dir, facts_file, out, "--resume")],
                      manifest.parent, 1, env=env, cwd=ROOT)
    stored = json.loads(manifest.read_text())
    finished = done_shards(manifest)
    assert 0 < len(finished) < stored["plan"]["n_shards"] == 4 and not out.exists()
    reused = {i for s in finished for i in range(*s["units"])}

    original, calls = evaluate.evaluate_fact, []

    def counting(adapter, fact, *args, **kwargs):
        calls.append(fact.uuid)
        return original(adapter, fact, *args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_fact", counting)
    assert cli.main(argv(tiny_gpt2_dir, facts_file, out, "--resume")) == 0
    assert calls == [f.uuid for i, f in enumerate(FACTS) if i not in reused]
    n = len(FACTS)
    assert f"computed {n - len(reused)}, reused {len(reused)}" in capsys.readouterr().out
    assert output_bytes(out) == output_bytes(full)
    assert not manifest.parent.exists()


class Crash(Exception):
    """A failure in the middle of a run (not an error of the input)."""


def interrupted_run(model, facts_file, out, monkeypatch) -> None:
    """A --resume run that crashes in its second shard: its run folder holds one finished shard (2 facts)."""
    original, calls = evaluate.evaluate_fact, []

    def stopping(adapter, fact, *args, **kwargs):
        calls.append(fact.uuid)
        if len(calls) == 3:
            raise Crash
        return original(adapter, fact, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(evaluate, "evaluate_fact", stopping)
        with pytest.raises(Crash):
            cli.main(argv(model, facts_file, out, "--resume"))
    assert len(done_shards(Path(f"{out}.ckpt") / "manifest.json")) == 1


def test_resume_with_other_option_or_facts_content_is_refused(tiny_gpt2_dir, facts_file, tmp_path,
                                                               monkeypatch, capsys):
    out = tmp_path / "r.json"
    interrupted_run(tiny_gpt2_dir, facts_file, out, monkeypatch)
    capsys.readouterr()
    assert cli.main(argv(tiny_gpt2_dir, facts_file, out, "--resume", "--seed", "3")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(differs in: search.seed);" in err
    assert "seed is 3 here, 0 in the run folder" in err
    # the same path with another content (as many facts, one answer changed)
    write_facts(facts_file, [*FACTS[:-1], ParaphraseFact(FACTS[-1].uuid, FACTS[-1].relation,
                                                          FACTS[-1].prompts, "Catalan")])
    assert cli.main(argv(tiny_gpt2_dir, facts_file, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(differs in: facts);" in err
    assert len(done_shards(Path(f"{out}.ckpt") / "manifest.json")) == 1 and not out.exists()


def test_resume_on_run_folder_of_another_analysis(tiny_gpt2_dir, facts_file, tmp_path, capsys):
    out = tmp_path / "r.json"
    key = {"kind": "trigger_examples", "k": 4}
    plan = make_plan([1, 1], 1, unit_name="sentences")
    Manifest(f"{out}.ckpt").open("trigger_examples", key, config_hash(key), lambda: plan)
    before = (Path(f"{out}.ckpt") / "manifest.json").read_bytes()
    assert cli.main(argv(tiny_gpt2_dir, facts_file, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("knowledge_neurons.py: error:")
    assert "holds a run of trigger_examples, not of neurons" in err
    assert (Path(f"{out}.ckpt") / "manifest.json").read_bytes() == before and not out.exists()


def test_no_leftovers_without_resume_after_an_error(tiny_gpt2_dir, facts_file, tmp_path, monkeypatch, capsys):
    original, calls = evaluate.evaluate_fact, []

    def failing(adapter, fact, *args, **kwargs):
        calls.append(fact.uuid)
        if len(calls) == 2:
            raise InputError(f"fact {fact.uuid}: cannot be measured")
        return original(adapter, fact, *args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_fact", failing)
    assert cli.main(argv(tiny_gpt2_dir, facts_file, tmp_path / "r.json")) == 2
    assert "cannot be measured" in capsys.readouterr().err and len(calls) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["facts.jsonl"]
