"""Shared command-line pieces of the ``fflayers`` command and of the ``analysis/*.py`` scripts.

Bad input is a :class:`~fflayers.core.FflayersError` (:class:`CLIError` for flags, ``ModelError`` /
``ModelError`` for models); :func:`run_main` turns it into one line ``PROG: error: MESSAGE`` on stderr and
exit code 2. :class:`Command` and :func:`dispatch` make the ``fflayers GROUP COMMAND`` tree.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import importlib
import io
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from fflayers.core import FflayersError, InputError

if TYPE_CHECKING:
    from fflayers.backends.base import LMAdapter

__all__ = ["CLIError", "Command", "Parser", "add_model_args", "check_model_args", "check_range", "dispatch",
           "load_adapter", "prog_name", "quiet_loading", "run_command", "run_main"]


class CLIError(InputError):
    """Bad command-line input (exit code 2)."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one-line :class:`CLIError`\\ s (no usage block, no exit). With an
    ``epilog`` (examples), the help keeps its line breaks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("epilog") and "formatter_class" not in kwargs:
            kwargs["formatter_class"] = argparse.RawDescriptionHelpFormatter
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{message} (see --help)")


#: options that are not part of an analysis's config: paths, the model and how to load it, the run's own
#: switches (the model and input files enter a resume key through their content fingerprints instead)
PLACE_OPTIONS = frozenset({"command", "output", "resume", "quiet", "verbose", "device", "trust_checkpoint",
                           "model_dir", "hf_model", "gguf_file", "facts", "countries_file", "paragraphs",
                           "device_map", "max_memory", "offload_folder"})


def where_of(args: argparse.Namespace) -> dict:
    """The place options that were given (paths and the model), for the metadata beside a config."""
    return {k: v for k, v in vars(args).items() if k in PLACE_OPTIONS and v not in (None, False)}


#: ``--load_dtype`` choices -> torch dtype names
LOAD_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def add_model_args(parser: argparse.ArgumentParser, tokenizer_only: bool = False,
                   dtype_flags: Sequence[str] = ("--load_dtype",)) -> None:
    """Add ``--model_dir``, ``--hf_model``, ``--gguf_file`` and (unless ``tokenizer_only``) ``--device``,
    ``--trust-checkpoint`` and the HuggingFace loading options (``dtype_flags``: the weights' dtype at load
    time; ``--device_map``, ``--max_memory``, ``--offload_folder``: a model larger than one device)."""
    if tokenizer_only:
        parser.add_argument("--model_dir", type=str, default=None, help="fairseq model dir (dict.txt)")
        parser.add_argument("--hf_model", type=str, default=None,
                            help="HuggingFace model id or folder (its tokenizer)")
    else:
        parser.add_argument("--model_dir", type=str, default=None,
                            help="fairseq model dir (model.pt + dict.txt)")
        parser.add_argument("--hf_model", type=str, default=None,
                            help="HuggingFace model id or local folder (instead of --model_dir)")
    parser.add_argument("--gguf_file", type=str, default=None,
                        help="GGUF file name inside --hf_model's folder")
    parser.add_argument("--verbose", action="store_true",
                        help="show the libraries' own loading output (GGUF de-quantization bars, fairseq "
                             "INFO lines)")
    if not tokenizer_only:
        parser.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:N")
        parser.add_argument("--trust-checkpoint", dest="trust_checkpoint", action="store_true",
                            help="allow full unpickling of a fairseq checkpoint you trust (old Namespace "
                                 "checkpoints)")
        hf = parser.add_argument_group("HuggingFace loading (a model larger than one device)")
        hf.add_argument(*dtype_flags, dest="load_dtype", choices=list(LOAD_DTYPES), default="fp32",
                        help="the weights' dtype at load time (fp16 wants a GPU)")
        hf.add_argument("--device_map", type=str, default=None,
                        help="auto, balanced, balanced_low_0, sequential, or a JSON object / file of module "
                             "-> device (0, cuda:1, cpu, disk): transformers and accelerate place the blocks")
        hf.add_argument("--max_memory", type=str, default=None,
                        help="with --device_map: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB")
        hf.add_argument("--offload_folder", type=str, default=None,
                        help="with --device_map: folder for the blocks it puts on disk")


def check_model_args(args: argparse.Namespace) -> None:
    """Exactly one of ``--model_dir`` / ``--hf_model``; ``--gguf_file`` only with ``--hf_model``."""
    if (args.model_dir is None) == (args.hf_model is None):
        raise CLIError("pass exactly one of --model_dir (fairseq) and --hf_model (HuggingFace)")
    if args.gguf_file and not args.hf_model:
        raise CLIError("--gguf_file goes with --hf_model")
    placement = [f"--{k}" for k in ("device_map", "max_memory", "offload_folder") if getattr(args, k, None)]
    if args.model_dir is not None and (placement or getattr(args, "load_dtype", "fp32") != "fp32"):
        raise CLIError(f"{' '.join(placement) or '--load_dtype'} applies to HuggingFace models (--hf_model); "
                       "fairseq models load whole, in float32")
    if placement and getattr(args, "device_map", None) is None:
        raise CLIError(f"{placement[0]} goes with --device_map (e.g. --device_map auto)")
    if getattr(args, "device", None) is not None:
        from fflayers.backends.base import resolve_device

        resolve_device(args.device)  # an unknown or absent device fails before the model loads


#: loggers whose INFO lines say nothing about the run (fairseq's speech tasks ask for tensorboardX on import)
_CHATTY_LOGGERS = ("fairseq", "fairseq.tasks.text_to_speech", "fairseq_cli")


def check_range(args: argparse.Namespace, name: str, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, why: str = "") -> None:
    """One-line :class:`CLIError` when ``--name`` (if given) lies outside ``[low, high]`` (an open end with
    ``low_open`` / ``high_open``); call it before the model loads."""
    value = getattr(args, name, None)
    if value is None:
        return
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        too_low = low is not None and (v <= low if low_open else v < low)
        too_high = high is not None and (v >= high if high_open else v > high)
        if too_low or too_high:
            lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
            hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
            rule = (f"in {lo}, {hi}" if low is not None and high is not None
                    else f"{'>' if low_open else '>='} {low:g}" if low is not None
                    else f"{'<' if high_open else '<='} {high:g}")
            raise CLIError(f"--{name} {v:g} must be {rule}{'; ' + why if why else ''}")


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

    from fflayers.backends.hf_attention import transformers_errors_only

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
            from fflayers.backends.fairseq_loading import load_fairseq_lm

            return load_fairseq_lm(args.model_dir, device=args.device, trust_checkpoint=args.trust_checkpoint,
                                   **fairseq_kwargs)
        from fflayers.backends.hf import load_hf_lm

        return load_hf_lm(args.hf_model, device=args.device, gguf_file=args.gguf_file,
                          **hf_load_options(args))


def hf_load_options(args: argparse.Namespace) -> dict:
    """The keywords of ``load_hf_lm`` set by the HuggingFace loading options (those not at their default)."""
    options = {"dtype": LOAD_DTYPES[getattr(args, "load_dtype", "fp32")], "device_map": args.device_map,
               "max_memory": args.max_memory, "offload_folder": args.offload_folder}
    return {k: v for k, v in options.items() if v is not None and v != "float32"}


#: the name of the running command, for its messages (set by run_main)
_PROG: contextvars.ContextVar[str | None] = contextvars.ContextVar("fflayers_cli_prog", default=None)


def prog_name(default: str = "fflayers") -> str:
    """The name of the running command (``dissect_recall.py`` or ``fflayers recall``), which its messages
    start with; ``default`` outside :func:`run_main`."""
    return _PROG.get() or default


def run_main(
    prog: str,
    build_parser: Callable[[], argparse.ArgumentParser],
    run: Callable[[argparse.Namespace], object],
    argv: Sequence[str] | None = None,
    name: str | None = None,
) -> int:
    """Parse ``argv`` and call ``run``; returns 0, or 2 with one line ``PROG: error: ...`` on stderr for bad
    input. While ``run`` runs, :func:`prog_name` is ``name`` (default ``prog``)."""
    token = _PROG.set(name or prog)
    args = None
    try:
        args = build_parser().parse_args(argv)
        run(args)
    except FflayersError as err:
        print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resumable = getattr(args, "resume", False)
        hint = ("finished units are saved; rerun with --resume to continue" if resumable
                else "no output was written (outputs appear only when complete)")
        print(f"\n{prog}: interrupted; {hint}", file=sys.stderr)
        return 130
    finally:
        _PROG.reset(token)
    return 0


def run_command(
    prog: str,
    build_parser: Callable[[str, str | None], argparse.ArgumentParser],
    run: Callable[[argparse.Namespace], object],
    argv: Sequence[str] | None,
    epilog: str | None = None,
    subcommands: Sequence[str] = (),
) -> int:
    """:func:`run_main` for the ``fflayers`` command ``prog``: ``build_parser(prog, epilog)`` makes the
    parser. For a parser with ``subcommands``, an error names the subcommand too (``fflayers recall knockout:
    error: ...``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    leaf = argv[0] if argv and argv[0] in subcommands else None
    return run_main(f"{prog} {leaf}" if leaf else prog, lambda: build_parser(prog, epilog), run, argv,
                    name=prog)


@dataclass(frozen=True)
class Command:
    """A command of ``fflayers``: a group of ``commands``, or a leaf whose ``command(argv, prog, epilog)`` is
    in ``fflayers.cli.MODULE`` (imported when it runs). ``examples`` end its help."""

    name: str
    help: str
    examples: tuple[str, ...]
    module: str | None = None
    commands: tuple[Command, ...] = ()

    def epilog(self) -> str:
        """The examples, as the end of the help text."""
        return "example" + ("s" if len(self.examples) > 1 else "") + ":\n" + "".join(
            f"  {x}\n" for x in self.examples)

    def main(self, argv: Sequence[str], prog: str) -> int:
        """Run the command as ``prog``; returns the exit code."""
        if self.commands:
            return dispatch(prog, self.help, self.commands, argv, self.epilog())
        module = importlib.import_module(f"fflayers.cli.{self.module}")
        return module.command(argv, prog, self.epilog())


def command_parser(prog: str, description: str, commands: Sequence[Command], epilog: str,
                   version: str | None = None) -> Parser:
    """The parser that lists ``commands`` in its help (``prog --help``; ``prog --version`` if ``version``)."""
    p = Parser(prog=prog, description=description, epilog=epilog)
    if version is not None:
        p.add_argument("--version", action="version", version=f"{prog} {version}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands",
                           parser_class=Parser)
    for c in commands:
        sub.add_parser(c.name, help=c.help, add_help=False)
    return p


def dispatch(prog: str, description: str, commands: Sequence[Command], argv: Sequence[str] | None,
             epilog: str, version: str | None = None) -> int:
    """Run the command named by ``argv[0]`` as ``PROG NAME`` with the rest of ``argv``; ``--help`` lists the
    commands, anything else is a one-line error (exit code 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    by_name = {c.name: c for c in commands}
    if argv and argv[0] in by_name:
        return by_name[argv[0]].main(argv[1:], f"{prog} {argv[0]}")

    def misplaced(args: argparse.Namespace) -> None:  # e.g. "fflayers -- memories"
        raise CLIError(f"give the command first: {prog} {args.command} ...")

    return run_main(prog, lambda: command_parser(prog, description, commands, epilog, version), misplaced,
                    argv)
