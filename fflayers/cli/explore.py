"""``fflayers explore``: the explorer's local web page (also ``python -m fflayers.explore``).

    fflayers explore --hf_model HuggingFaceTB/SmolLM2-135M
    fflayers explore --model_dir wt103_lm --memories top50_textual --agreement kv.tsv --values values.parquet

Binds 127.0.0.1 (``--port``, default 8765) and prints the URL; with ``--host`` another address is bound and
every request needs the access token printed once at start (or ``--token``). The page and its JSON API:
docs/explorer.md. Bad input: one line on stderr, exit code 2, before the model loads where it can.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fflayers.cli.common import (
    CLIError,
    Parser,
    add_model_args,
    check_model_args,
    hf_load_options,
    load_adapter,
    run_command,
)

if TYPE_CHECKING:
    from fflayers.backends.base import LMAdapter
    from fflayers.explore import Explorer

__all__ = ["PROG", "build_explorer", "build_parser", "command", "load_code", "main", "run"]

PROG = "fflayers explore"


def build_parser(prog: str = PROG, epilog: str | None = None) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=epilog)
    add_model_args(p, dtype_flags=("--dtype", "--load_dtype"))
    p.add_argument("--memories", type=str, default=None,
                   help="trigger examples: the folder of `fflayers memories textual` (DIM_LAYER.txt files)")
    p.add_argument("--agreement", type=str, default=None, help="the .tsv of `fflayers memories agreement`")
    p.add_argument("--values", type=str, default=None,
                   help="the parquet of `fflayers embedding export` (the token search); else computed once "
                        "and cached beside --notes")
    p.add_argument("--shortcuts", type=str, default=None,
                   help="maps.safetensors of `fflayers shortcuts fit`: adds the mat lens")
    p.add_argument("--neurons", type=str, default=None, help="results.json of `fflayers neurons`")
    p.add_argument("--notes", type=str, default=None,
                   help="SQLite file of value names and notes (default ~/.cache/fflayers/explorer.sqlite)")
    p.add_argument("--host", type=str, default="127.0.0.1",
                   help="address to bind (default loopback; any other needs the access token)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument("--token", type=str, default=None,
                   help="access token (default: a random one when --host is not loopback)")
    return p


def check_args(args: argparse.Namespace) -> None:
    check_model_args(args)
    for flag in ("memories", "agreement", "values", "shortcuts", "neurons"):
        path = getattr(args, flag)
        if path is not None and not Path(path).exists():
            raise CLIError(f"--{flag} {path} does not exist")
    if not 0 < args.port < 65536:
        raise CLIError(f"--port {args.port} must be in 1..65535")
    if args.token is not None and len(args.token) < 8:
        raise CLIError("--token must be at least 8 characters")


def load_code(args: argparse.Namespace) -> str:
    """The Python line that loads the model as this command did (for exported snippets)."""
    if args.model_dir is not None:
        return (f"from fflayers.backends.fairseq_loading import load_fairseq_lm\n"
                f"adapter = load_fairseq_lm({args.model_dir!r})")
    extra = f", gguf_file={args.gguf_file!r}" if args.gguf_file else ""
    extra += "".join(f", {k}={v!r}" for k, v in hf_load_options(args).items())
    return f"from fflayers.backends.hf import load_hf_lm\nadapter = load_hf_lm({args.hf_model!r}{extra})"


def build_explorer(adapter: LMAdapter, *, memories: str | os.PathLike | None = None,
                   agreement: str | os.PathLike | None = None, values: str | os.PathLike | None = None,
                   shortcuts: str | os.PathLike | None = None, neurons: str | os.PathLike | None = None,
                   notes: str | os.PathLike | None = None, load_code: str = "adapter = ...  # load the model",
                   name: str = "model") -> Explorer:
    """An :class:`~fflayers.explore.Explorer` of ``adapter`` with the outputs of earlier runs: ``memories``
    (a ``fflayers memories textual`` folder), ``agreement`` (its TSV), ``values`` (the embedding-space export;
    else the values' top tokens are computed on the first search and cached beside ``notes``), ``shortcuts``
    (``maps.safetensors``: the ``mat`` lens), ``neurons`` (``results.json``), ``notes`` (SQLite; default
    ``~/.cache/fflayers/explorer.sqlite``)."""
    from fflayers.embedding_space.value_index import ValueIndex
    from fflayers.explore import Explorer, Notes
    from fflayers.explore.notes import default_notes_path
    from fflayers.memories.index import MemoryIndex
    from fflayers.runs import model_fingerprint

    index = MemoryIndex(memories, agreement, neurons)
    store = Notes(notes or default_notes_path())
    cache = store.path.parent / f"values-{model_fingerprint(adapter)[:16]}.parquet"
    lenses = {}
    if shortcuts is not None:
        from fflayers.lenses import LinearShortcutLens
        from fflayers.shortcuts import load_maps

        lenses["mat"] = LinearShortcutLens(adapter, load_maps(shortcuts, adapter)[0])
    return Explorer(adapter, lenses=lenses, memories=index,
                    values=ValueIndex(adapter, values, cache_path=cache), notes=store, load_code=load_code,
                    name=name)


def run(args: argparse.Namespace) -> None:
    from fflayers.explore.server import serve

    check_args(args)
    adapter = load_adapter(args)
    name = Path(args.model_dir).name if args.model_dir else args.hf_model
    explorer = build_explorer(adapter, memories=args.memories, agreement=args.agreement, values=args.values,
                              shortcuts=args.shortcuts, neurons=args.neurons, notes=args.notes,
                              load_code=load_code(args), name=str(name))
    serve(explorer, host=args.host, port=args.port, token=args.token)


def main(argv: Sequence[str] | None = None) -> int:
    return command(argv, "python -m fflayers.explore")


def command(argv: Sequence[str] | None, prog: str = PROG, epilog: str | None = None) -> int:
    return run_command(prog, build_parser, run, argv, epilog)
