"""The shared command-line wrapper: one-line errors with exit code 2, model flag checks, flag parsing."""

from __future__ import annotations

import argparse

import pytest

from fflayers.backends.base import AdapterError
from fflayers.cli import CLIError, Parser, add_model_args, check_model_args, run_main

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
    assert (args.hf_model, args.gguf_file, args.device, args.n, args.model_dir) == ("m", "f.gguf", "cpu", 3, None)
    assert args.trust_checkpoint is False
    assert capsys.readouterr().err == ""
    seen.clear()
    assert make_main(seen)(["--model_dir", "d", "--trust-checkpoint"]) == 0
    assert seen[0].trust_checkpoint is True and seen[0].device == "auto"


@pytest.mark.parametrize("argv", [["--model_dir", "d", "--bogus"], ["--model_dir", "d", "--n", "x"], ["--hf_model"]])
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


@pytest.mark.parametrize("exc", [CLIError, AdapterError])
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
