"""Agreement between each FFN value's top prediction and its key's trigger examples
(``key_value_agreement.py``).

Reads a folder of textual trigger files (``{dim}_{layer}.txt``, written by ``fflayers memories textual`` /
``trigger_examples_jsonl_to_textual.py``), projects every value of the model through its own output head and
writes ``{output_base}.tsv`` (layer, W2_dim, max_prob, embedding_index, embedding_token,
embedding_token_target_count, target_rankings as a JSON list), ``{output_base}_max_probs.json``
(``[L][d_ff]``; ``null`` for layers left out with ``--layers``) and ``{output_base}.meta.json``; with
``--random_baseline`` also ``{output_base}_random.tsv`` (random vectors with the values' norms). See
:mod:`fflayers.memories.agreement` for the definitions and where they differ from the original script (real
output layer in eval mode; the starred next token as target). ``--resume`` keeps the finished shards of the
run (:mod:`fflayers.runs`) in ``{output_base}.ckpt`` and continues from them; a rerun with other options,
another model or other textual files is refused, naming what differs.

Example (``python analysis/key_value_agreement.py ...`` is the same)::

    fflayers memories agreement --model_dir checkpoints/adaptive_lm_wiki103.v2 \\
        --data_dir top50_textual --output_base key_value_top50
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from fflayers.cli.common import (
    CLIError,
    Parser,
    add_model_args,
    check_model_args,
    load_adapter,
    prog_name,
    run_command,
    run_main,
)

__all__ = ["PROG", "build_parser", "check_args", "to_tsv_frame", "run", "main", "command"]

PROG = "key_value_agreement.py"


def build_parser(prog: str = PROG, epilog: str | None = None) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=epilog)
    add_model_args(p)
    p.add_argument("--data_dir", type=str, default=None, help="folder of {dim}_{layer}.txt trigger files")
    p.add_argument("--output_base", type=str, default=None,
                   help="writes OUTPUT_BASE.tsv and OUTPUT_BASE_max_probs.json")
    p.add_argument("--layers", nargs="*", type=int, default=None, help="layers to analyse (default: all)")
    p.add_argument("--chunk_values", type=int, default=None,
                   help="values projected at once (default: ~16M log-probs)")
    p.add_argument("--random_baseline", action="store_true",
                   help="also write OUTPUT_BASE_random.tsv (random values)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    p.add_argument("--resume", action="store_true",
                   help="keep finished shards in OUTPUT_BASE.ckpt and continue from them")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def check_args(args: argparse.Namespace) -> None:
    check_model_args(args)
    if not args.data_dir:
        raise CLIError("--data_dir is required: the folder written by trigger_examples_jsonl_to_textual.py")
    if not args.output_base:
        raise CLIError("--output_base is required")
    if args.chunk_values is not None and args.chunk_values < 1:
        raise CLIError(f"--chunk_values {args.chunk_values} must be >= 1")
    if not Path(args.data_dir).is_dir():
        raise CLIError(f"--data_dir {args.data_dir} does not exist; pass the output folder of "
                       "trigger_examples_jsonl_to_textual.py")


def output_paths(base: str, random_baseline: bool) -> dict[str, Path]:
    from fflayers.io import check_writable

    paths = {"tsv": base + ".tsv", "json": base + "_max_probs.json", "meta": base + ".meta.json"}
    if random_baseline:
        paths["random"] = base + "_random.tsv"
    return {k: check_writable(v) for k, v in paths.items()}


def load_model(args: argparse.Namespace):
    return load_adapter(args)


_CONTROL = str.maketrans({"\t": "\\t", "\n": "\\n", "\r": "\\r"})


def to_tsv_frame(table):
    """The table with ``target_rankings`` as JSON lists (one cell each) and tab / newline / carriage-return
    characters of token strings written as ``\\t``, ``\\n``, ``\\r``, so that every value stays on one
    line."""
    out = table.copy()
    out["target_rankings"] = [json.dumps(list(map(int, r))) for r in table["target_rankings"]]
    out["embedding_token"] = [str(t).translate(_CONTROL) for t in table["embedding_token"]]
    return out


def run(args: argparse.Namespace) -> None:
    from fflayers.distributed import dist_info, finish, join_ranks

    check_args(args)
    info = dist_info()
    if info.enabled:  # torchrun: the value chunks are split over the ranks, rank 0 writes the outputs
        args.device = str(join_ranks(info, args.device, timeout_s=24 * 3600))
    try:
        agreement(args, info)
    finally:
        finish()


def agreement(args: argparse.Namespace, info) -> None:
    from fflayers.io import run_metadata, write_json, write_table
    from fflayers.memories.agreement import AgreementTask, max_probs_by_layer, targets_from_examples
    from fflayers.memories.textual import check_vocabulary, read_target_ids, read_textual_dir, textual_digest
    from fflayers.runs import model_fingerprint, run_units

    start = time.time()
    examples = read_textual_dir(args.data_dir)
    stored_ids = read_target_ids(args.data_dir)
    paths = output_paths(args.output_base, args.random_baseline)
    adapter = load_model(args)
    check_vocabulary(args.data_dir, adapter.vocab)
    layers = None if not args.layers else [adapter.check_layer(x) for x in args.layers]
    targets, n_unknown = targets_from_examples(adapter, examples, stored_ids)
    del examples
    n_targets = sum(len(t) for t in targets.values())
    source = "exact token ids stored by the textual step" if stored_ids else "looked up by their strings"
    if info.is_main:
        print(f"{prog_name()}: {len(targets)} keys, {n_targets} trigger targets ({source}; {n_unknown} not "
              f"in the vocabulary -> unk), model {adapter}"
              + (f", {info.world_size} ranks" if info.enabled else ""))
    task = AgreementTask(adapter, targets, layers, args.chunk_values, args.random_baseline, args.seed)
    run_dir = Path(args.output_base + ".ckpt") if args.resume else None
    fingerprints = {"model": model_fingerprint(adapter), "textual": textual_digest(args.data_dir)}
    done = run_units(task, task.config, kind=task.kind, run_dir=run_dir, fingerprints=fingerprints,
                     unit_name="values", progress=not args.quiet, desc="key-value agreement")
    if not info.is_main:
        return
    merged, done.result = done.result, None
    table, random_table = task.tables(merged)
    config = dict(vars(args))
    config.update(model=repr(adapter), keys=len(targets), targets=n_targets, unknown_targets=n_unknown,
                  stored_target_ids=bool(stored_ids),
                  seconds=round(time.time() - start, 3))
    written: list[Path] = []
    try:
        write_table(paths["tsv"], to_tsv_frame(table))
        written.append(paths["tsv"])
        write_json(paths["json"], max_probs_by_layer(table, adapter.n_layers))
        written.append(paths["json"])
        if random_table is not None:
            write_table(paths["random"], to_tsv_frame(random_table))
            written.append(paths["random"])
        write_json(paths["meta"], run_metadata(config))
    except BaseException:
        for path in written:  # no partial output
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    if run_dir is not None:
        print(f"{prog_name()}: {done.plan['n_shards']} shards; computed {done.computed_all}, reused "
              f"{done.reused} finished shard(s)")
        shutil.rmtree(run_dir, ignore_errors=True)
    print(f"{prog_name()}: wrote {paths['tsv']} and {paths['json']} in {time.time() - start:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``key_value_agreement.py``; returns the exit code (2 for bad input, with one line on
    stderr)."""
    return run_main(PROG, build_parser, run, argv)


def command(argv: Sequence[str] | None, prog: str, epilog: str | None = None) -> int:
    """``fflayers memories agreement``: the same, named ``prog``."""
    return run_command(prog, build_parser, run, argv, epilog)
