"""Linear shortcuts between layers ("Jump to Conclusions"): fit A_{j,i}, r^2, shortcuts to the output, early
exit.

    fflayers shortcuts fit --hf_model gpt2 --data_file wiki.train.tokens \\
        --train_sentences 9000 --val_sentences 3000 --output_dir shortcuts_gpt2
    fflayers shortcuts r2 --hf_model gpt2 --output_dir shortcuts_gpt2
    fflayers shortcuts evaluate --hf_model gpt2 --output_dir shortcuts_gpt2
    fflayers shortcuts early-exit --hf_model gpt2 --output_dir shortcuts_gpt2
    fflayers shortcuts submodules --hf_model gpt2 --output_dir shortcuts_gpt2
    fflayers shortcuts plot --output_dir shortcuts_gpt2

(``python analysis/linear_shortcuts.py SUBCOMMAND ...`` is the same.) ``fit`` reads the corpus (WikiText
``.tokens`` (detokenized for subword models), text or ``.jsonl``), shuffles its sentences with ``--seed``,
takes ``--train_sentences`` then ``--val_sentences``, draws one random position per sentence (causal LMs: the
prefix up to it; masked LMs: that token replaced by the mask token; for training
``--positions_per_sentence N`` or ``--positions all`` take more), writes ``positions.parquet`` (split,
sentence_index, position, input_ids: anyone can recompute the states) and fits every A_{j,i}, 0 <= i < j <= L,
by least squares without intercept from Gram matrices accumulated in one pass (``maps.safetensors``, tensor
``A_{j}_{i}`` applied as ``x_j = A @ x_i``); both are written after the pass. The pass is a run of
:mod:`fflayers.runs` over blocks of ``--shard_positions`` positions: ``--resume`` keeps the finished blocks in
``OUTPUT_DIR/maps.safetensors.ckpt`` and continues an interrupted fit from them (``submodules --resume``: in
``OUTPUT_DIR/submodule_maps.safetensors.ckpt``), and under ``torchrun`` the ranks split the blocks (the maps
are those of one process). ``r2``, ``evaluate`` and ``early-exit`` recompute the validation states from
``positions.parquet`` and write ``r2.tsv``, ``evaluate.tsv``, ``early_exit.tsv`` and figures (PNG + PDF);
``submodules`` fits the linear map of every submodule inside each block on the training positions
(``submodule_maps.safetensors``), scores them (``submodule_r2.tsv``) and compares the five shortcuts id, mat,
mat_attn, mat_ffn and mat_ln1_ln2 on the validation positions (``submodule_evaluate.tsv``); ``all`` runs fit
and the three of them in one process (one model load; r2 only for an encoder without an output head); ``plot``
redraws the figures from the tables. Bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from fflayers.cli.common import (
    CLIError,
    Parser,
    add_model_args,
    check_model_args,
    check_range,
    load_adapter,
    prog_name,
    run_command,
    run_main,
)

__all__ = ["PROG", "MODEL_COMMANDS", "build_parser", "check_args", "run", "main", "command"]

PROG = "linear_shortcuts.py"
MODEL_COMMANDS = ("fit", "r2", "evaluate", "early-exit", "submodules", "all")
#: Subcommands with a pass over positions (resumable, split over torchrun ranks); the rest runs on rank 0.
PASS_COMMANDS = ("fit", "all", "submodules")
#: The run folder of each pass, beside its output.
RUN_FOLDERS = {"fit": "maps.safetensors.ckpt", "submodules": "submodule_maps.safetensors.ckpt"}
DEFAULT_LAMBDAS = [round(0.1 * x, 2) for x in range(11)]


def build_parser(prog: str = PROG, epilog: str | None = None) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=epilog)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name in ("fit", "all"):
        s = sub.add_parser(name, help="positions and all maps A_{j,i}" if name == "fit" else
                           "fit, then r2, evaluate and early-exit in one process (one model load)")
        _fit_args(s)
        if name == "all":
            s.add_argument("--lambdas", nargs="+", type=float, default=DEFAULT_LAMBDAS,
                           help="confidence thresholds")
    helps = {"r2": "r^2 of mat and id for every (i, j)",
             "evaluate": "precision@k and surprisal of id / mat shortcuts to the output",
             "early-exit": "layers saved vs precision@1 over a lambda grid",
             "submodules": "maps of ln1 / attn / ln2 / mlp / residual steps inside each block, and the "
                           "mat_attn / mat_ffn / mat_ln1_ln2 shortcuts"}
    for name in ("r2", "evaluate", "early-exit", "submodules"):
        s = sub.add_parser(name, help=helps[name])
        add_model_args(s)
        if name == "early-exit":
            s.add_argument("--lambdas", nargs="+", type=float, default=DEFAULT_LAMBDAS,
                           help="confidence thresholds")
        if name == "submodules":
            s.add_argument("--layers", type=int, nargs="+", default=None,
                           help="blocks whose submodules are fitted (default all; the shortcuts need every "
                                "block from the source layer on)")
            s.add_argument("--ridge", type=float, default=1e-6,
                           help="ridge relative to the mean diagonal of X^T X (default 1e-6: a residual "
                                "step's input can be nearly rank-deficient)")
            s.add_argument("--eval_positions", type=int, default=None,
                           help="validation positions for the five shortcuts (default all; each costs 3 L "
                                "forward passes)")
            _resume_args(s, "submodule_maps.safetensors.ckpt")
    for s in sub.choices.values():
        s.add_argument("--output_dir", type=str, required=True,
                       help="folder of the run (positions, maps, tables)")
        if s.prog.split()[-1] in MODEL_COMMANDS:
            s.add_argument("--batch_size", type=int, default=32, help="positions per forward pass")
            s.add_argument("--quiet", action="store_true", help="no progress bars")
    sub.add_parser("plot", help="redraw the figures from the tables").add_argument(
        "--output_dir", type=str, required=True, help="folder of the run")
    return p


def _fit_args(s: argparse.ArgumentParser) -> None:
    add_model_args(s)
    s.add_argument("--data_file", type=str, required=True, help="corpus (WikiText .tokens, text or .jsonl)")
    s.add_argument("--train_sentences", type=int, default=9000)
    s.add_argument("--val_sentences", type=int, default=3000)
    s.add_argument("--seed", type=int, default=0, help="sentence order and positions")
    s.add_argument("--ridge", type=float, default=0.0,
                   help="ridge penalty relative to the mean diagonal of X_i^T X_i, e.g. 1e-3 "
                        "(needed when positions < d or a state's Gram matrix is singular)")
    s.add_argument("--raw_wikitext", action="store_true", help="subword models read .tokens text as it is")
    s.add_argument("--positions", choices=("random", "all"), default="random", help="training positions per "
                   "sentence: random (--positions_per_sentence of them) or all (validation: one at random)")
    s.add_argument("--positions_per_sentence", type=int, default=1, help="random training positions per "
                   "sentence (default 1, the paper's)")
    _resume_args(s, "maps.safetensors.ckpt")


def _resume_args(s: argparse.ArgumentParser, folder: str) -> None:
    s.add_argument("--resume", action="store_true",
                   help=f"keep finished blocks of positions in OUTPUT_DIR/{folder} and continue an "
                        "interrupted pass from them")
    s.add_argument("--shard_positions", type=int, default=1024,
                   help="positions per block of the pass (a shard of the run folder)")


def check_args(args: argparse.Namespace) -> None:
    check_range(args, "lambdas", 0, 1, why="a lambda is a probability threshold of the top-1 prediction")
    for name in ("batch_size", "shard_positions", "train_sentences", "val_sentences",
                 "positions_per_sentence"):
        check_range(args, name, 1)
    if args.command in MODEL_COMMANDS:
        check_model_args(args)
    if args.command in ("fit", "all"):
        if not Path(args.data_file).is_file():
            raise CLIError(f"--data_file {args.data_file} does not exist; pass a corpus file")
        check_range(args, "ridge", 0)
    elif not Path(args.output_dir).is_dir():
        raise CLIError(f"--output_dir {args.output_dir} does not exist; run `{prog_name()} fit` first")


# ----- fit --------------------------------------------------------------------------------------------------


def run_fit_pass(task, config, args, out: Path, name: str, fingerprints: dict, desc: str):
    """The pass ``task`` (run folder with ``--resume``); on rank 0 its report printed, ``(run, run folder)``
    returned; None elsewhere."""
    from fflayers.distributed import dist_info
    from fflayers.shortcuts.passes import FIT_KIND, SUBMODULES_KIND, run_pass

    run_dir = out / RUN_FOLDERS[name] if args.resume else None
    kind = FIT_KIND if name == "fit" else SUBMODULES_KIND
    done = run_pass(task, config, kind, run_dir, fingerprints, progress=not args.quiet, desc=desc)
    if not dist_info().is_main:
        return None
    plan = done.plan
    print(f"{prog_name()}: {name}: {plan['n_shards']} shards of {plan['n_units']} blocks of positions; "
          f"computed {done.computed_all}, reused {done.reused} finished shard(s)")
    return done, run_dir


def run_fit(adapter, args, out: Path) -> bool:
    """Sample the positions, run the pass and solve the maps; rank 0 then writes ``positions.parquet``,
    ``maps.safetensors`` and ``fit.meta.json``. Returns whether this process wrote them (rank 0)."""
    import pandas as pd

    from fflayers.io import file_sha256, run_metadata, write_json, write_table
    from fflayers.runs import file_digest
    from fflayers.shortcuts import fit_maps, maps_metadata, positions_frame, sample_positions, save_maps
    from fflayers.shortcuts.passes import FitConfig, StatesPass, positions_digest
    from fflayers.shortcuts.positions import corpus_sentences

    train_ids, val_ids = corpus_sentences(adapter, args.data_file, args.train_sentences,
                                          args.val_sentences, args.seed, args.raw_wikitext)
    train = sample_positions(adapter, train_ids, seed=args.seed, mode=args.positions,
                             per_sentence=args.positions_per_sentence)
    val = sample_positions(adapter, val_ids, seed=args.seed + 1)
    _check_determined(len(train), adapter.d_model, args.ridge)
    config = FitConfig(args.train_sentences, args.val_sentences, args.seed, args.raw_wikitext,
                       args.batch_size, args.shard_positions, len(train), args.positions,
                       args.positions_per_sentence)
    task = StatesPass(adapter, train, args.shard_positions, args.batch_size)
    prints = {"data_file": file_digest(args.data_file), "positions": positions_digest(train)}
    ran = run_fit_pass(task, config, args, out, "fit", prints, desc="fit: states")
    if ran is None:
        return False
    done, run_dir = ran
    maps = fit_maps(task.result(done.result), ridge=args.ridge)
    table = pd.concat([positions_frame(train, "train"), positions_frame(val, "val")], ignore_index=True)
    write_table(out / "positions.parquet", table)
    print(f"{prog_name()}: {len(train)} training and {len(val)} validation positions -> "
          f"{out / 'positions.parquet'}")
    meta = maps_metadata(adapter, data_hash=file_sha256(out / "positions.parquet"), seed=args.seed,
                         n_positions=len(train), ridge=args.ridge)
    save_maps(out / "maps.safetensors", maps, meta)
    write_json(out / "fit.meta.json", run_metadata(dict(vars(args)), inputs={"data_file": args.data_file}))
    if run_dir is not None:
        shutil.rmtree(run_dir, ignore_errors=True)
    print(f"{prog_name()}: {len(maps)} maps A_(j,i) -> {out / 'maps.safetensors'}")
    return True


def _check_determined(n: int, d: int, ridge: float) -> None:
    """Refuse, before the pass, a fit without ridge on fewer positions than dimensions."""
    if ridge == 0 and n < d:
        raise CLIError(f"underdetermined: {n} positions for d = {d} dims; use more sentences or pass --ridge")


# ----- validation analyses ----------------------------------------------------------------------------------


def validation_states(adapter, args, out: Path):
    from fflayers.io import read_table
    from fflayers.shortcuts import collect_states, load_maps, positions_from_frame

    path = out / "positions.parquet"
    if not path.is_file():
        raise CLIError(f"{path} does not exist; run `{prog_name()} fit --output_dir {out}` first")
    maps, _meta = load_maps(out / "maps.safetensors", adapter)
    positions = positions_from_frame(read_table(path), "val")
    if not positions:
        raise CLIError(f"{path} holds no validation positions; rerun fit with --val_sentences >= 1")
    states = collect_states(adapter, positions, batch_size=args.batch_size, progress=not args.quiet)
    return states, maps


def run_submodules(adapter, args, out: Path) -> None:
    """Fit the submodule maps on the training positions, score them and the five shortcuts on validation."""
    import pandas as pd

    from fflayers.io import file_sha256, read_table, run_metadata, write_json, write_table
    from fflayers.runs import file_digest
    from fflayers.shortcuts import collect_states, evaluate_shortcuts, load_maps, positions_from_frame
    from fflayers.shortcuts.evaluate import has_output_head
    from fflayers.shortcuts.linear_maps import model_id
    from fflayers.shortcuts.passes import PointsPass, SubmodulesConfig
    from fflayers.shortcuts.submodules import (
        SUBMODULE_MAPPINGS,
        evaluate_submodule_shortcuts,
        save_submodule_maps,
        submodule_r2,
    )

    if args.ridge < 0:
        raise CLIError(f"--ridge {args.ridge} must be >= 0")
    if args.eval_positions is not None and args.eval_positions < 1:
        raise CLIError(f"--eval_positions {args.eval_positions} must be >= 1")
    path = out / "positions.parquet"
    if not path.is_file():
        raise CLIError(f"{path} does not exist; run `{prog_name()} fit --output_dir {out}` first")
    frame = read_table(path)
    train, val = positions_from_frame(frame, "train"), positions_from_frame(frame, "val")
    if not train or len(val) < 2:
        raise CLIError(f"{path} needs training positions and at least 2 validation positions; rerun fit")
    layers = None if args.layers is None else [adapter.check_layer(x) for x in args.layers]
    _check_determined(len(train), adapter.d_model, args.ridge)
    task = PointsPass(adapter, train, layers, args.shard_positions, args.batch_size)
    config = SubmodulesConfig(task.layers, args.batch_size, task.block, len(train))
    ran = run_fit_pass(task, config, args, out, "submodules", {"positions_file": file_digest(path)},
                   desc="submodule maps")
    if ran is None:
        return
    done, run_dir = ran
    maps = task.result(done.result).fit(args.ridge)
    save_submodule_maps(out / "submodule_maps.safetensors", maps,
                        {"model": model_id(adapter), "data_hash": file_sha256(path), "ridge": str(args.ridge),
                         "layout": adapter.block_layout, "positions": str(len(train))})
    r2 = submodule_r2(adapter, val, maps, batch_size=args.batch_size)
    write_table(out / "submodule_r2.tsv", r2)
    print(r2.pivot_table(index="layer", columns=["submodule", "mapping"], values="r2", sort=False)
          .to_string(float_format=lambda x: f"{x:.3f}"))
    if has_output_head(adapter):
        evaluated = val[: args.eval_positions]
        fitted = sorted({layer for layer, _ in maps})
        first = next(x for x in range(adapter.n_layers + 1)
                     if all(b in fitted for b in range(x, adapter.n_layers)))
        names = [m for m in SUBMODULE_MAPPINGS if adapter.block_layout != "post_norm" or m != "mat_ln1_ln2"]
        tables = []
        if (out / "maps.safetensors").is_file():
            layer_maps, _ = load_maps(out / "maps.safetensors", adapter)
            states = collect_states(adapter, evaluated, batch_size=args.batch_size, progress=not args.quiet)
            tables.append(evaluate_shortcuts(adapter, states, layer_maps))
        if first < adapter.n_layers:
            tables.append(evaluate_submodule_shortcuts(adapter, evaluated, maps, names,
                                                       range(first, adapter.n_layers),
                                                       batch_size=args.batch_size, progress=not args.quiet))
        table = pd.concat(tables, ignore_index=True).sort_values(["layer"], kind="stable")
        write_table(out / "submodule_evaluate.tsv", table)
        print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    write_json(out / "submodules.meta.json", run_metadata(dict(vars(args))))
    if run_dir is not None:
        shutil.rmtree(run_dir, ignore_errors=True)


def run(args: argparse.Namespace) -> None:
    from fflayers.distributed import dist_info, finish, join_ranks

    check_args(args)
    info = dist_info()
    if info.enabled and args.command in PASS_COMMANDS:
        args.device = str(join_ranks(info, args.device, timeout_s=7 * 24 * 3600))
    elif not info.is_main:
        return  # under torchrun, ranks split the passes; everything else runs on rank 0
    try:
        run_subcommand(args)
    finally:
        finish()


def run_subcommand(args: argparse.Namespace) -> None:
    """One subcommand (on every rank for a pass; rank 0 does the rest)."""
    from fflayers.distributed import dist_info
    from fflayers.io import write_table
    from fflayers.shortcuts.figures import draw_figures

    start = time.time()
    out = Path(args.output_dir)
    if args.command == "plot":
        written = draw_figures(out)
        if not written:
            raise CLIError(f"{out} holds no r2.tsv, evaluate.tsv or early_exit.tsv; "
                           "run those subcommands first")
        print(f"{prog_name()}: wrote {len(written)} figure files to {out}")
        return
    if args.command in ("fit", "all"):
        from fflayers.io import check_folder_writable

        created = not out.is_dir()
        if created:
            try:
                out.mkdir(exist_ok=True)
            except OSError as err:
                raise CLIError(f"cannot create --output_dir {out} ({err.strerror}); "
                               "choose another folder") from None
        try:
            check_folder_writable(out)
            adapter = load_adapter(args)
            wrote = run_fit(adapter, args, out)
        except BaseException:
            if created:  # a failed fit leaves no empty folder behind
                with contextlib.suppress(OSError):
                    out.rmdir()
            raise
        if not wrote:
            return
        if args.command == "fit":
            print(f"{prog_name()}: fit done in {time.time() - start:.1f} s ({out})")
            return
    else:
        adapter = load_adapter(args)
    if args.command == "submodules":
        run_submodules(adapter, args, out)
        if not dist_info().is_main:
            return
        draw_figures(out)
        print(f"{prog_name()}: submodules done in {time.time() - start:.1f} s ({out})")
        return
    from fflayers.shortcuts.evaluate import has_output_head

    states, maps = validation_states(adapter, args, out)
    analyses = [args.command] if args.command != "all" else ["r2", "evaluate", "early-exit"]
    if args.command == "all" and not has_output_head(adapter):
        print(f"{prog_name()}: the model has no output head (an encoder): r2 only")
        analyses = ["r2"]
    for name in analyses:
        if name == "r2":
            from fflayers.shortcuts import r2_scores

            table = r2_scores(states, maps)
        elif name == "evaluate":
            from fflayers.shortcuts import evaluate_shortcuts

            table = evaluate_shortcuts(adapter, states, maps)
        else:
            from fflayers.shortcuts import early_exit

            table = early_exit(adapter, states, maps, args.lambdas)
        write_table(out / f"{name.replace('-', '_')}.tsv", table)
        if name != "r2":  # r2 has (L+1) L / 2 rows per mapping: see r2.tsv and the heatmap
            print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    draw_figures(out)
    print(f"{prog_name()}: {args.command} done in {time.time() - start:.1f} s ({out})")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``linear_shortcuts.py``; returns the exit code (2 for bad input, one line on stderr)."""
    return run_main(PROG, build_parser, run, argv)


def command(argv: Sequence[str] | None, prog: str, epilog: str | None = None) -> int:
    """``fflayers shortcuts``: the same, named ``prog``."""
    return run_command(prog, build_parser, run, argv, epilog, subcommands=(*MODEL_COMMANDS, "plot"))
