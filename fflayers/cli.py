"""Shared command-line pieces of the ``analysis/*.py`` scripts.

Bad input is a :class:`CLIError` (or :class:`~fflayers.backends.base.AdapterError`); :func:`run_main` turns it
into one line ``PROG: error: MESSAGE`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from fflayers.backends.base import AdapterError, LMAdapter

__all__ = ["CLIError", "Parser", "add_model_args", "check_model_args", "load_adapter", "quiet_loading", "run_main"]


class CLIError(Exception):
    """Bad command-line input (exit code 2)."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one-line :class:`CLIError`\\ s (no usage block, no exit)."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{message} (see --help)")


def add_model_args(parser: argparse.ArgumentParser, tokenizer_only: bool = False) -> None:
    """Add ``--model_dir``, ``--hf_model``, ``--gguf_file`` and (unless ``tokenizer_only``) ``--device`` and
    ``--trust-checkpoint``."""
    if tokenizer_only:
        parser.add_argument("--model_dir", type=str, default=None, help="fairseq model dir (dict.txt)")
        parser.add_argument("--hf_model", type=str, default=None,
                            help="HuggingFace model id or folder (its tokenizer)")
    else:
        parser.add_argument("--model_dir", type=str, default=None, help="fairseq model dir (model.pt + dict.txt)")
        parser.add_argument("--hf_model", type=str, default=None,
                            help="HuggingFace model id or local folder (instead of --model_dir)")
    parser.add_argument("--gguf_file", type=str, default=None, help="GGUF file name inside --hf_model's folder")
    parser.add_argument("--verbose", action="store_true",
                        help="show the libraries' own loading output (GGUF de-quantization bars, fairseq INFO lines)")
    if not tokenizer_only:
        parser.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:N")
        parser.add_argument("--trust-checkpoint", dest="trust_checkpoint", action="store_true",
                            help="allow full unpickling of a fairseq checkpoint you trust (old Namespace checkpoints)")


def check_model_args(args: argparse.Namespace) -> None:
    """Exactly one of ``--model_dir`` / ``--hf_model``; ``--gguf_file`` only with ``--hf_model``."""
    if (args.model_dir is None) == (args.hf_model is None):
        raise CLIError("pass exactly one of --model_dir (fairseq) and --hf_model (HuggingFace)")
    if args.gguf_file and not args.hf_model:
        raise CLIError("--gguf_file goes with --hf_model")


#: loggers whose INFO lines say nothing about the run (fairseq's speech tasks ask for tensorboardX on import)
_CHATTY_LOGGERS = ("fairseq", "fairseq.tasks.text_to_speech", "fairseq_cli")


@contextlib.contextmanager
def quiet_loading(verbose: bool = False) -> Iterator[None]:
    """Hide the libraries' own output while a model or tokenizer loads (progress bars such as transformers'
    GGUF de-quantization bar, INFO lines), unless ``verbose``. The run's own progress bars and errors stay."""
    if verbose:
        yield
        return
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    from fflayers.backends.hf import transformers_errors_only

    hf_logging.disable_progress_bar()
    root = logging.getLogger()
    root_level, root_handlers = root.level, list(root.handlers)
    try:
        # errors only: load reports (missing / unexpected keys) of checkpoints without a head
        with transformers_errors_only(), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        # importing fairseq calls logging.basicConfig(level=DEBUG) (wav2vec2 modules): undo it
        root.setLevel(root_level)
        root.handlers[:] = root_handlers


def load_adapter(args: argparse.Namespace, **fairseq_kwargs: Any) -> LMAdapter:
    """The model of ``--model_dir`` (fairseq; ``fairseq_kwargs`` go to ``load_fairseq_lm``) or ``--hf_model``,
    loaded quietly unless ``--verbose``."""
    with quiet_loading(getattr(args, "verbose", False)):
        if args.model_dir is not None:
            from fflayers.backends.fairseq_lm import load_fairseq_lm

            return load_fairseq_lm(args.model_dir, device=args.device, trust_checkpoint=args.trust_checkpoint,
                                   **fairseq_kwargs)
        from fflayers.backends.hf import load_hf_lm

        return load_hf_lm(args.hf_model, device=args.device, gguf_file=args.gguf_file)


def run_main(
    prog: str,
    build_parser: Callable[[], argparse.ArgumentParser],
    run: Callable[[argparse.Namespace], object],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv`` and call ``run``; returns 0, or 2 with one line ``PROG: error: ...`` on stderr for bad input."""
    try:
        run(build_parser().parse_args(argv))
    except (CLIError, AdapterError) as err:
        print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0
