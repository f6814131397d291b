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
prefix up to it; masked LMs: that token replaced by the mask token), writes ``positions.parquet`` (split,
sentence_index, position, input_ids: anyone can recompute the states) and fits every A_{j,i}, 0 <= i < j <= L,
by least squares without intercept from Gram matrices accumulated in one pass (``maps.safetensors``, tensor
``A_{j}_{i}`` applied as ``x_j = A @ x_i``). ``--resume`` continues an interrupted fit from its last finished
shard of 1,024 positions. ``r2``, ``evaluate`` and ``early-exit`` recompute the validation states from
``positions.parquet`` and write ``r2.tsv``, ``evaluate.tsv``, ``early_exit.tsv`` and figures (PNG + PDF);
``submodules`` fits the linear map of every submodule inside each block on the training positions
(``submodule_maps.safetensors``), scores them (``submodule_r2.tsv``) and compares the five shortcuts id, mat,
mat_attn, mat_ffn and mat_ln1_ln2 on the validation positions (``submodule_evaluate.tsv``); ``all`` runs fit
and the three of them in one process (one model load; r2 only for an encoder without an output head); ``plot``
redraws the figures from the tables. Bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
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

__all__ = ["PROG", "MODEL_COMMANDS", "build_parser", "check_args", "run", "main", "command"]

PROG = "linear_shortcuts.py"
MODEL_COMMANDS = ("fit", "r2", "evaluate", "early-exit", "submodules", "all")
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
    s.add_argument("--resume", action="store_true",
                   help="continue an interrupted fit from OUTPUT_DIR/fit.ckpt")
    s.add_argument("--shard_positions", type=int, default=1024, help="positions between two checkpoints")


def check_args(args: argparse.Namespace) -> None:
    if args.command in MODEL_COMMANDS:
        check_model_args(args)
        if args.batch_size < 1:
            raise CLIError(f"--batch_size {args.batch_size} must be >= 1")
    if args.command in ("fit", "all"):
        if not Path(args.data_file).is_file():
            raise CLIError(f"--data_file {args.data_file} does not exist; pass a corpus file")
        if args.train_sentences < 1 or args.val_sentences < 1:
            raise CLIError("--train_sentences and --val_sentences must be >= 1")
        if args.ridge < 0:
            raise CLIError(f"--ridge {args.ridge} must be >= 0")
    elif not Path(args.output_dir).is_dir():
        raise CLIError(f"--output_dir {args.output_dir} does not exist; run `{prog_name()} fit` first")


# ----- fit --------------------------------------------------------------------------------------------------


def _sentences(adapter, args) -> tuple[list[list[int]], list[list[int]]]:
    from fflayers.data import model_sentences

    wanted = args.train_sentences + args.val_sentences
    texts = model_sentences(adapter, args.data_file, args.seed, wanted, args.raw_wikitext)
    limit = adapter.max_positions or 10**9
    ids = [seq[:limit] for seq in (adapter.vocab.tokenize(t) for t in texts) if len(seq) > 1]
    if len(ids) < 2:
        raise CLIError(f"the corpus yields {len(ids)} usable sentences; pass a larger corpus")
    n_train = min(args.train_sentences, len(ids) - 1) if len(ids) < wanted else args.train_sentences
    return ids[:n_train], ids[n_train:wanted]


def run_fit(adapter, args, out: Path) -> None:
    import torch
    from tqdm.auto import tqdm

    from fflayers.io import atomic_write, file_sha256, run_metadata, write_json, write_table
    from fflayers.shortcuts import (
        GramAccumulator,
        fit_maps,
        iter_state_batches,
        maps_metadata,
        positions_frame,
        sample_positions,
        save_maps,
    )

    train_ids, val_ids = _sentences(adapter, args)
    train = sample_positions(adapter, train_ids, seed=args.seed)
    val = sample_positions(adapter, val_ids, seed=args.seed + 1)
    import pandas as pd

    table = pd.concat([positions_frame(train, "train"), positions_frame(val, "val")], ignore_index=True)
    write_table(out / "positions.parquet", table)
    print(f"{prog_name()}: {len(train)} training and {len(val)} validation positions -> "
          f"{out / 'positions.parquet'}")
    S, d = adapter.n_layers + 1, adapter.d_model
    ckpt = out / "fit.ckpt"
    key = (f"{file_sha256(out / 'positions.parquet')}|{adapter.d_model}|{adapter.n_layers}|"
           f"{args.shard_positions}")
    acc = GramAccumulator(S, d, device=adapter.device)
    done = 0
    if args.resume and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if state.get("key") != key:
            raise CLIError(f"{ckpt} was made with another model, corpus, seed or shard size; "
                           "rerun without --resume")
        for block, saved in zip(acc.blocks, state["blocks"], strict=True):
            block.copy_(saved)
        acc.n, done = int(state["n"]), int(state["done"])
        print(f"{prog_name()}: resuming after {done} of {len(train)} positions")
    shard = max(1, args.shard_positions)
    bar = tqdm(total=len(train), initial=done, unit="pos", desc="fit: states", disable=args.quiet)
    for start in range(done, len(train), shard):
        part = train[start : start + shard]
        for states in iter_state_batches(adapter, part, batch_size=args.batch_size):
            acc.update(states)
            bar.update(states.shape[0])
        with atomic_write(ckpt, "wb") as f:
            torch.save({"key": key, "done": start + len(part), "n": acc.n,
                        "blocks": [b.cpu() for b in acc.blocks]}, f)
    bar.close()
    maps = fit_maps(acc, ridge=args.ridge)
    meta = maps_metadata(adapter, data_hash=file_sha256(out / "positions.parquet"), seed=args.seed,
                         n_positions=len(train), ridge=args.ridge)
    save_maps(out / "maps.safetensors", maps, meta)
    ckpt.unlink(missing_ok=True)
    write_json(out / "fit.meta.json", run_metadata(dict(vars(args)), inputs={"data_file": args.data_file}))
    print(f"{prog_name()}: {len(maps)} maps A_(j,i) -> {out / 'maps.safetensors'}")


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
    from fflayers.shortcuts import collect_states, evaluate_shortcuts, load_maps, positions_from_frame
    from fflayers.shortcuts.linear_maps import model_id
    from fflayers.shortcuts.submodules import (
        SUBMODULE_MAPPINGS,
        evaluate_submodule_shortcuts,
        fit_submodule_maps,
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
    maps = fit_submodule_maps(adapter, train, layers, batch_size=args.batch_size, ridge=args.ridge,
                              progress=not args.quiet)
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


def has_output_head(adapter) -> bool:
    """False for encoders without an LM/MLM head (their states can be mapped, not decoded)."""
    from fflayers.core import ModelError

    try:
        adapter.output_embeddings()
    except ModelError:
        return False
    return True


def draw_figures(out: Path) -> list[Path]:
    from fflayers.io import read_table
    from fflayers.plots import (
        plot_early_exit,
        plot_r2_heatmap,
        plot_shortcut_precision,
        plot_submodule_r2,
        save_figure,
    )

    written: list[Path] = []
    for name, plot in (("r2", plot_r2_heatmap), ("evaluate", plot_shortcut_precision),
                       ("early_exit", plot_early_exit), ("submodule_r2", plot_submodule_r2),
                       ("submodule_evaluate", _plot_submodule_evaluate)):
        path = out / f"{name}.tsv"
        if path.is_file():
            written += save_figure(plot(read_table(path)), out / name)
    return written


def _plot_submodule_evaluate(table):
    from fflayers.plots import plot_shortcut_precision

    return plot_shortcut_precision(table[["layer", "mapping", "precision@1", "surprisal"]],
                                   title="Shortcuts with one kind of submodule replaced by its linear map")


def run(args: argparse.Namespace) -> None:
    from fflayers.io import write_table

    check_args(args)
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

        if not out.is_dir():
            try:
                out.mkdir()
            except OSError as err:
                raise CLIError(f"cannot create --output_dir {out} ({err.strerror}); "
                               "choose another folder") from None
        check_folder_writable(out)
        adapter = load_adapter(args)
        run_fit(adapter, args, out)
        if args.command == "fit":
            print(f"{prog_name()}: fit done in {time.time() - start:.1f} s ({out})")
            return
    else:
        adapter = load_adapter(args)
    if args.command == "submodules":
        run_submodules(adapter, args, out)
        draw_figures(out)
        print(f"{prog_name()}: submodules done in {time.time() - start:.1f} s ({out})")
        return
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
