"""The shared command-line wrapper (one-line errors with exit code 2, model flag checks, flag parsing) and the
``fflayers`` command: its help tree, its leaves against the scripts, and the one table-suffix rule."""

from __future__ import annotations

import argparse
import json

import pytest

from fflayers.cli import CLIError, Parser, add_model_args, check_model_args, run_main
from fflayers.core import ModelError

PROG = "tool.py"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG)
    add_model_args(p)
    p.add_argument("--n", type=int, default=1)
    return p


def make_main(seen: list):
    def run(args: argparse.Namespace) -> None:
        check_model_args(args)
        seen.append(args)

    return lambda argv: run_main(PROG, build_parser, run, argv)


def error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert captured.out == ""
    return lines[0]


def test_good_flags_run_and_return_0(capsys):
    seen: list = []
    assert make_main(seen)(["--hf_model", "m", "--gguf_file", "f.gguf", "--device", "cpu", "--n", "3"]) == 0
    (args,) = seen
    assert (args.hf_model, args.gguf_file, args.device, args.n, args.model_dir) == ("m", "f.gguf",
                                                                                    "cpu", 3, None)
    assert args.trust_checkpoint is False
    assert capsys.readouterr().err == ""
    seen.clear()
    assert make_main(seen)(["--model_dir", "d", "--trust-checkpoint"]) == 0
    assert seen[0].trust_checkpoint is True and seen[0].device == "auto"


@pytest.mark.parametrize("argv",
                         [["--model_dir", "d", "--bogus"], ["--model_dir", "d", "--n", "x"], ["--hf_model"]])
def test_bad_flag_is_one_line_and_exit_2(argv, capsys):
    seen: list = []
    assert make_main(seen)(argv) == 2
    line = error_line(capsys)
    assert line.startswith(f"{PROG}: error: ") and line.endswith("(see --help)")
    assert seen == []


@pytest.mark.parametrize("argv", [[], ["--model_dir", "d", "--hf_model", "m"]])
def test_both_or_neither_model_flag_exit_2(argv, capsys):
    seen: list = []
    assert make_main(seen)(argv) == 2
    assert error_line(capsys) == (
        f"{PROG}: error: pass exactly one of --model_dir (fairseq) and --hf_model (HuggingFace)")
    assert seen == []


def test_gguf_needs_hf_model(capsys):
    assert make_main([])(["--model_dir", "d", "--gguf_file", "f.gguf"]) == 2
    assert error_line(capsys) == f"{PROG}: error: --gguf_file goes with --hf_model"


@pytest.mark.parametrize("exc", [CLIError, ModelError])
def test_multi_line_messages_are_joined(exc, capsys):
    def run(args):
        raise exc("first line\n  second   line")

    assert run_main(PROG, lambda: Parser(prog=PROG), run, []) == 2
    assert error_line(capsys) == f"{PROG}: error: first line second line"


def test_other_exceptions_propagate():
    def run(args):
        raise KeyError("bug")

    with pytest.raises(KeyError):
        run_main(PROG, lambda: Parser(prog=PROG), run, [])


def test_tokenizer_only_has_no_device_flags(capsys):
    p = Parser(prog=PROG)
    add_model_args(p, tokenizer_only=True)
    args = p.parse_args(["--model_dir", "d"])
    assert not hasattr(args, "device") and not hasattr(args, "trust_checkpoint")
    with pytest.raises(CLIError, match="unrecognized arguments: --device"):
        p.parse_args(["--model_dir", "d", "--device", "cpu"])


def test_quiet_loading_hides_library_bars_and_info_lines_unless_verbose(capsys):
    import logging

    from tqdm.auto import tqdm

    from fflayers.cli import quiet_loading

    logger = logging.getLogger("fairseq.tasks.text_to_speech")
    handler = logging.StreamHandler()  # bound to the captured stderr now
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)

    def load():
        for _ in tqdm(range(3), desc="Converting and de-quantizing"):
            pass
        logger.info("Please install tensorboardX")

    try:
        with quiet_loading(verbose=True):
            load()
        loud = capsys.readouterr().err
        logger.setLevel(logging.INFO)
        with quiet_loading(verbose=False):
            load()
        logger.info("Please install tensorboardX")  # the level stays raised after loading
        quiet = capsys.readouterr().err
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert "de-quantizing" in loud and "tensorboardX" in loud
    assert quiet == ""
    for _ in tqdm(range(2), desc="the run's own bar"):  # bars after loading are shown
        pass
    assert "the run's own bar" in capsys.readouterr().err


def test_verbose_flag():
    p = Parser(prog=PROG)
    add_model_args(p, tokenizer_only=True)
    assert p.parse_args(["--model_dir", "d", "--verbose"]).verbose is True
    assert p.parse_args(["--model_dir", "d"]).verbose is False


# ----- the fflayers command ---------------------------------------------------------------------------------

GROUPS = ("memories", "recall", "shortcuts", "neurons", "embedding", "merge")
#: fflayers command -> (script module in analysis/, the script's arguments before the flags)
LEAVES = {
    ("memories", "mine"): ("generate_outputs", ()),
    ("memories", "textual"): ("trigger_examples_jsonl_to_textual", ()),
    ("memories", "agreement"): ("key_value_agreement", ()),
    ("memories", "plot"): ("plot_memories", ()),
    **{("recall", s): ("dissect_recall", (s,)) for s in
       ("facts", "knockout", "project", "extraction", "enrichment", "sublayer-knockout", "plot")},
    **{("shortcuts", s): ("linear_shortcuts", (s,)) for s in
       ("fit", "r2", "evaluate", "early-exit", "submodules", "all", "plot")},
    ("neurons",): ("knowledge_neurons", ()),
    **{("embedding", s): ("embedding_space", (s,)) for s in
       ("keys", "values", "heads", "tsne", "neurons-vs-hidden", "export")},
    ("merge",): ("merge_shards", ()),
}


def help_of(main, argv, capsys) -> str:
    """What ``main(argv + ["--help"])`` prints (it exits 0, as argparse does)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def flags_section(text: str) -> str:
    """The argument list of a help text: from its first argument heading up to the examples."""
    lines = text.splitlines()
    start = next(i for i, x in enumerate(lines) if x in ("options:", "positional arguments:"))
    end = next((i for i, x in enumerate(lines) if x in ("example:", "examples:")), len(lines))
    assert start < end, text
    return "\n".join(lines[start:end]).strip()


def test_fflayers_help_lists_every_group_with_examples(capsys):
    from fflayers.cli.main import main

    out = help_of(main, [], capsys)
    assert out.startswith("usage: fflayers ")
    for group in GROUPS:
        assert f"    {group} " in out or f"    {group}\n" in out
        assert f"\n  fflayers {group} " in out.split("examples:")[1]


@pytest.mark.parametrize("group", GROUPS)
def test_group_help_lists_its_commands_with_an_example(group, capsys):
    from fflayers.cli.main import main

    out = help_of(main, [group], capsys)
    assert out.startswith(f"usage: fflayers {group} ")
    assert "\nexample" in out and f"\n  fflayers {group} " in out.split("\nexample")[1]
    for path in LEAVES:
        if path[0] == group and len(path) == 2:
            assert f"    {path[1]} " in out or f"    {path[1]}\n" in out


@pytest.mark.parametrize("path", list(LEAVES), ids=" ".join)
def test_every_leaf_takes_the_flags_of_its_script(path, capsys):
    """Same parser-building code: the argument list of ``fflayers ... --help`` is the script's."""
    import importlib

    from fflayers.cli.main import main

    script, sub = LEAVES[path]
    out = help_of(main, list(path), capsys)
    assert out.startswith(f"usage: fflayers {' '.join(path)} ")
    theirs = help_of(importlib.import_module(f"analysis.{script}").main, list(sub), capsys)
    assert flags_section(out) == flags_section(theirs)


def test_installed_console_script_help():
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "fflayers"
    assert exe.is_file(), (f"{exe} is missing: install the project (pip install -e .) "
                           "to get the console script")
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: fflayers ") and all(g in proc.stdout for g in GROUPS)


@pytest.mark.parametrize("argv, prefix", [
    ([], "fflayers: error: "),
    (["bogus"], "fflayers: error: argument COMMAND: invalid choice: 'bogus'"),
    (["memories"], "fflayers memories: error: "),
    (["memories", "agreement", "--bogus"], "fflayers memories agreement: error: unrecognized arguments"),
    (["memories", "agreement", "--hf_model", "m"],
     "fflayers memories agreement: error: --data_dir is required"),
    (["recall", "knockout", "--hf_model", "m", "--countries"], "fflayers recall knockout: error: "),
    (["shortcuts", "plot"], "fflayers shortcuts plot: error: "),
    (["merge", "--keep"], "fflayers merge: error: "),
])
def test_fflayers_errors_are_one_line_with_the_command_name(argv, prefix, capsys):
    from fflayers.cli.main import main

    assert main(argv) == 2
    assert error_line(capsys).startswith(prefix)


def _textual_dir(adapter, folder):
    from fflayers.memories.textual import format_line, write_marker

    words = [adapter.dictionary[i] for i in range(adapter.dictionary.nspecial, len(adapter.dictionary))]
    for (layer, dim), targets in {(0, 3): ["the", "city", "and"], (1, 10): ["river", "qqqnotaword", "</s>"],
                                  (1, 255): words[:20]}.items():
        lines = [format_line(10.0 - j, f"w{j} prefix", t) for j, t in enumerate(targets)]
        (folder / f"{dim}_{layer}.txt").write_text("\n".join(lines) + "\n")
    write_marker(folder, adapter.vocab)
    return folder


def test_memories_agreement_writes_the_files_of_key_value_agreement_py(fairseq_adaptive_lm, tmp_path, capsys):
    from analysis import key_value_agreement as kva
    from fflayers.backends.fairseq_loading import load_fairseq_lm
    from fflayers.cli.main import main

    data = tmp_path / "textual"
    data.mkdir()
    _textual_dir(load_fairseq_lm(fairseq_adaptive_lm.model_dir, device="cpu"), data)
    flags = ["--model_dir", str(fairseq_adaptive_lm.model_dir), "--data_dir", str(data), "--device", "cpu",
             "--random_baseline", "--seed", "3", "--quiet"]
    assert kva.main([*flags, "--output_base", str(tmp_path / "script")]) == 0
    assert main(["memories", "agreement", *flags, "--output_base", str(tmp_path / "command")]) == 0
    out = capsys.readouterr().out
    assert "fflayers memories agreement: wrote " in out and "key_value_agreement.py: wrote " in out
    for suffix in (".tsv", "_max_probs.json", "_random.tsv"):
        script, command = tmp_path / f"script{suffix}", tmp_path / f"command{suffix}"
        assert script.read_bytes() == command.read_bytes() and script.stat().st_size > 0, suffix
    config = [json.loads((tmp_path / f"{x}.meta.json").read_text())["config"] for x in ("script", "command")]
    for c in config:
        c.pop("output_base"), c.pop("seconds")
    assert config[0] == config[1]


@pytest.mark.parametrize("name", ["t.txt", "t.xlsx", "t"])
def test_unknown_output_suffix_is_refused_before_the_model_loads(name, tmp_path, capsys):
    """No model is found at --hf_model: the suffix error comes first, and nothing is written."""
    from fflayers.cli.main import main
    from fflayers.io import TABLE_SUFFIXES

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The cat sat on the mat.\n")
    facts = tmp_path / "known.json"
    facts.write_text(json.dumps([{"known_id": 0, "subject": "France", "attribute": "Paris",
                                  "prompt": "The capital of France is"}]))
    model = ["--hf_model", str(tmp_path / "no-model"), "--device", "cpu"]
    out = str(tmp_path / name)
    runs = {
        "--output_file": [["memories", "mine", "--data_file", str(corpus), *model, "--get_trigger_examples",
                           "--output_file", out],
                          ["memories", "mine", "--data_file", str(corpus), *model, "--extract_ffn_info",
                           "--extract_mode", "layer", "--output_file", out],
                          ["embedding", "export", *model, "--output_file", out],
                          ["embedding", "values", *model, "--output_file", out],
                          ["merge", "--output_file", out]],
        "--output": [["recall", "knockout", *model, "--facts", str(facts), "--output", out]],
    }
    before = sorted(tmp_path.iterdir())
    for flag, argvs in runs.items():
        for argv in argvs:
            assert main(argv) == 2, argv
            line = error_line(capsys)
            assert (line.startswith(f"fflayers {argv[0]}")
                    and f"error: {flag} {out}: unknown table format" in line)
            assert line.endswith(", ".join(TABLE_SUFFIXES)), line
    assert sorted(tmp_path.iterdir()) == before


def test_unknown_input_suffix_is_refused(tmp_path, capsys):
    from fflayers.cli.main import main

    table = tmp_path / "t.xlsx"
    table.write_text("layer\n0\n")
    assert main(["recall", "plot", "--kind", "knockout", "--input", str(table), "--output",
                 str(tmp_path / "f")]) == 2
    assert f"--input {table}: unknown table format '.xlsx'" in error_line(capsys)
    assert main(["memories", "plot", "--ffn_info", str(table), "--output_dir", str(tmp_path / "figs")]) == 2
    assert f"--ffn_info {table}: unknown table format '.xlsx'" in error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.xlsx"]


def test_write_and_read_table_follow_one_suffix_rule(tmp_path):
    import pandas as pd

    from fflayers.core import InputError
    from fflayers.io import TABLE_SUFFIXES, read_table, write_table

    df = pd.DataFrame({"layer": [0, 1], "token": ["a", "nan"]})
    for suffix in TABLE_SUFFIXES:
        path = tmp_path / f"t{suffix}"
        assert write_table(path, df) == 2
        back = read_table(path, **({"keep_default_na": False} if suffix in (".tsv", ".csv") else {}))
        pd.testing.assert_frame_equal(back, df)
    assert write_table(tmp_path / "c.parquet", iter([df, df]), chunked=True) == 4
    assert write_table(tmp_path / "c.tsv", iter([df, df]), chunked=True) == 4
    assert len(read_table(tmp_path / "c.parquet")) == len(read_table(tmp_path / "c.tsv")) == 4
    names = sorted(p.name for p in tmp_path.iterdir())
    for bad in ("t.txt", "t.xlsx", "t"):
        with pytest.raises(InputError,
                           match="unknown table format .* ending in .parquet, .tsv, .csv, .jsonl"):
            write_table(tmp_path / bad, df)
        with pytest.raises(InputError, match="unknown table format"):
            read_table(tmp_path / bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == names
