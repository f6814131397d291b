"""What every ``recall`` subcommand shares: the subcommand record, the model / fact / output options, and
reading, encoding and filtering the facts."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fflayers.cli.common import CLIError, add_model_args, prog_name
from fflayers.io import TABLE_SUFFIXES

if TYPE_CHECKING:
    from fflayers.backends.base import LMAdapter

__all__ = ["Subcommand", "add_shared_args", "read_facts", "main_print", "report_skipped", "encoded_facts"]


@dataclass(frozen=True)
class Subcommand:
    """A subcommand: its help, its own arguments, and what it runs. Model subcommands get the shared model,
    fact and output options (see :func:`add_shared_args`)."""

    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]
    needs_model: bool = True


def add_shared_args(s: argparse.ArgumentParser,
                    output_help: str = f"result table ({', '.join(TABLE_SUFFIXES)})") -> None:
    """Model, facts, output, batching, resume and progress options of every model subcommand."""
    add_model_args(s)
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--facts", type=str,
                     help="facts as ROME's known_1000 JSON (known_id, subject, attribute, prompt)")
    src.add_argument("--countries", action="store_true",
                     help="country -> capital facts from the Debian countries list "
                          "(prompt 'The capital of {} is')")
    s.add_argument("--countries_file", type=str, default=None,
                   help="another countries list (code:a2:a3:country:capital)")
    s.add_argument("--filter", action="store_true",
                   help="keep only the facts whose top-1 next token is the attribute's first token")
    s.add_argument("--max_facts", type=int, default=None,
                   help="use at most this many facts (after filtering)")
    s.add_argument("--output", type=str, required=True, help=output_help)
    s.add_argument("--batch_size", type=int, default=32, help="sequences per forward pass")
    s.add_argument("--resume", action="store_true",
                   help="keep finished blocks of facts in OUTPUT.ckpt and continue an interrupted run "
                        "from them")
    s.add_argument("--quiet", action="store_true", help="no progress bars")


def read_facts(args: argparse.Namespace) -> list:
    """The facts of ``--facts`` or ``--countries``; bad entries are reported on stderr and skipped."""
    from fflayers.recall import countries_facts, load_facts

    if args.countries:
        from fflayers.data.countries import COUNTRIES_FILE

        return countries_facts(args.countries_file or COUNTRIES_FILE)
    skipped: list[str] = []
    facts = load_facts(args.facts, skipped=skipped)
    report_skipped(skipped, "cannot be read")
    if not facts and not skipped:
        facts_command = prog_name() + " facts --countries --hf_model MODEL --output facts.json"
        raise CLIError(f"--facts {args.facts} holds no facts; build a fact file with `{facts_command}` "
                       "(or pass --countries)")
    if not facts:
        raise CLIError(f"--facts {args.facts} holds no usable fact ({len(skipped)} skipped)")
    return facts


def main_print(*values: object, **kwargs: Any) -> None:
    """``print`` on rank 0 only (every process outside ``torchrun``)."""
    from fflayers.distributed import dist_info

    if dist_info().is_main:
        print(*values, **kwargs)


def report_skipped(messages: Sequence[str], reason: str) -> None:
    """One stderr line per skipped fact, then how many were skipped and why."""
    for msg in messages:
        main_print(f"{prog_name()}: skipped {' '.join(msg.split())}", file=sys.stderr)
    if messages:
        main_print(f"{prog_name()}: {len(messages)} fact(s) skipped: {reason}", file=sys.stderr)


def encoded_facts(adapter: LMAdapter, args: argparse.Namespace, facts: list | None = None) -> list:
    """Read (unless given), encode and (with ``--filter``) filter the facts; prints what was kept and
    skipped."""
    from fflayers.recall import encode_facts, filter_facts

    facts = read_facts(args) if facts is None else facts
    encoded, skipped = encode_facts(adapter, facts, skip_bad=True)
    report_skipped(skipped, "cannot be encoded for this model")
    n_encoded = len(encoded)
    if args.filter:
        encoded = filter_facts(adapter, encoded, batch_size=args.batch_size)
        main_print(f"{prog_name()}: {len(encoded)} of {n_encoded} facts predicted correctly "
                   f"(top-1 = attribute's first token); {n_encoded - len(encoded)} filtered out")
    if args.max_facts is not None:
        encoded = encoded[: args.max_facts]
    if not encoded:
        raise CLIError("no fact left to analyse (see the messages above); check the facts, or drop --filter")
    return encoded
