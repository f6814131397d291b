"""Convert a trigger-examples JSONL file (``generate_outputs.py --get_trigger_examples``) into one text file
per key, ``{dim}_{layer}.txt``, each line ``fc1_value<TAB>prefix *next token*`` (see
:mod:`fflayers.memories.textual`).

    fflayers memories textual --input_file top50.jsonl --model_dir checkpoints/adaptive_lm_wiki103.v2 \
        --output_dir top50_output

(``python analysis/trigger_examples_jsonl_to_textual.py ...`` is the same.)

``--model_dir`` (fairseq, word-level: only its dict.txt is checked, no checkpoint is loaded) or ``--hf_model``
(its tokenizer re-tokenizes each text as for mining; ``--gguf_file`` for GGUF folders). ``--output_dir``
defaults to the input name with ``.jsonl`` replaced by ``.outp``; a non-empty folder is refused unless
``--overwrite`` (the original asked interactively). Bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from fflayers.cli.common import (
    CLIError,
    Parser,
    add_model_args,
    prog_name,
    quiet_loading,
    run_command,
    run_main,
)

__all__ = ["PROG", "build_parser", "tokens_for", "run", "main", "command"]

PROG = "trigger_examples_jsonl_to_textual.py"


def build_parser(prog: str = PROG, epilog: str | None = None) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=epilog)
    p.add_argument("--input_file", type=str, required=True, help="trigger examples .jsonl")
    add_model_args(p, tokenizer_only=True)
    p.add_argument("--output_dir", type=str, default="",
                   help="output folder (default: INPUT with .jsonl -> .outp)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def tokens_for(args: argparse.Namespace):
    """``(tokens, vocabulary)``: how trigger texts become lines, and the vocabulary recorded in the marker."""
    from fflayers.backends.hf_vocab import HFVocabulary
    from fflayers.memories.textual import SubwordTokens, WordLevel

    if (args.model_dir is None) == (args.hf_model is None):
        raise CLIError("pass exactly one of --model_dir (fairseq) and --hf_model (HuggingFace)")
    if args.model_dir is not None:
        dict_path = Path(args.model_dir) / "dict.txt"
        if not dict_path.is_file():
            raise CLIError(f"--model_dir {args.model_dir} has no dict.txt; pass a fairseq model dir")
        from fflayers.backends.fairseq_loading import load_dictionary
        from fflayers.backends.fairseq_vocab import FairseqVocabulary

        return WordLevel(), FairseqVocabulary(load_dictionary(dict_path))
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    try:
        with quiet_loading(args.verbose):
            tokenizer = AutoTokenizer.from_pretrained(args.hf_model, **kwargs)
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot load a tokenizer from {args.hf_model!r} "
                       f"({str(err).splitlines()[0]})") from None
    vocab = HFVocabulary(tokenizer, None, len(tokenizer))  # the tokenizer only: no model load
    return SubwordTokens(vocab), vocab


def run(args: argparse.Namespace) -> int:
    from fflayers.memories.textual import check_output_dir, write_textual

    output_dir = args.output_dir
    if not output_dir:
        if not args.input_file.endswith(".jsonl"):
            raise CLIError("--output_dir is required when --input_file does not end in .jsonl")
        output_dir = args.input_file[: -len(".jsonl")] + ".outp"
    if not Path(args.input_file).is_file():
        raise CLIError(f"--input_file {args.input_file} does not exist")
    check_output_dir(output_dir, args.overwrite)
    tokens, vocabulary = tokens_for(args)
    n = write_textual(args.input_file, output_dir, tokens, overwrite=args.overwrite, progress=not args.quiet,
                      vocabulary=vocabulary)
    print(f"{prog_name()}: wrote {n} files to {output_dir}")
    return n


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``trigger_examples_jsonl_to_textual.py``; returns the exit code (2 for bad input, with
    one line on stderr)."""
    return run_main(PROG, build_parser, run, argv)


def command(argv: Sequence[str] | None, prog: str, epilog: str | None = None) -> int:
    """``fflayers memories textual``: the same, named ``prog``."""
    return run_command(prog, build_parser, run, argv, epilog)
