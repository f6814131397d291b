"""Dissecting factual recall (Geva et al., 2023): fact sets, attention knockout and the other analyses.

    python analysis/dissect_recall.py facts --hf_model gpt2-xl --facts known_1000.json --filter --output known.json
    python analysis/dissect_recall.py facts --hf_model DIR --gguf_file F.gguf --countries --filter --output caps.json
    python analysis/dissect_recall.py knockout --hf_model gpt2-xl --facts known.json --output knockout.parquet
    python analysis/dissect_recall.py project --hf_model gpt2-xl --facts known.json --positions subject_last last \
        --no_final_norm --output projections.parquet
    python analysis/dissect_recall.py extraction --hf_model gpt2-xl --facts known.json \
        --variants none block_subject block_non_subject block_last patch_subject --output extraction.parquet
    python analysis/dissect_recall.py enrichment --hf_model gpt2-xl --facts known.json --paragraphs wiki.txt \
        --output enrichment.parquet
    python analysis/dissect_recall.py sublayer-knockout --hf_model gpt2-xl --facts known.json --paragraphs wiki.txt \
        --window 10 --output sublayer_knockout.parquet
    python analysis/dissect_recall.py plot --kind knockout --input knockout.parquet --output knockout

Every model subcommand reads facts from ``--facts`` (ROME's known_1000 JSON) or ``--countries`` (the Debian
country -> capital list, prompt "The capital of {} is"); ``--filter`` keeps the facts whose top-1 next token is
the attribute's first token. A fact that cannot be used (subject not in its prompt, a missing field, a prompt
longer than the model) is reported on one line and skipped; the run goes on with the others. Tables are written
in the format of ``--output``'s extension (.parquet, .csv, .tsv, .jsonl) with ``OUTPUT.meta.json`` beside them;
``--resume`` continues an interrupted run from ``OUTPUT.partial.parquet``. ``plot`` draws a table's figure as
PNG and PDF. Bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fflayers.cli import CLIError, Parser, add_model_args, check_model_args, load_adapter, run_main

PROG = "dissect_recall.py"
TABLE_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl")


# ----- registry -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Subcommand:
    """A subcommand: its help, its own arguments, and what it runs. Model subcommands get the shared model,
    fact and output options (see :func:`add_shared_args`)."""

    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]
    needs_model: bool = True


#: name -> subcommand, in the order of ``--help``
SUBCOMMANDS: dict[str, Subcommand] = {}
#: plot kind -> (function drawing a Figure from a table and the args, default title)
PLOT_KINDS: dict[str, Callable] = {}


def register(command: Subcommand) -> Subcommand:
    SUBCOMMANDS[command.name] = command
    return command


def add_shared_args(s: argparse.ArgumentParser, output_help: str = "result table (.parquet, .csv, .tsv, .jsonl)") -> None:
    """Model, facts, output, batching, resume and progress options of every model subcommand."""
    add_model_args(s)
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--facts", type=str, help="facts as ROME's known_1000 JSON (known_id, subject, attribute, prompt)")
    src.add_argument("--countries", action="store_true",
                     help="country -> capital facts from the Debian countries list (prompt 'The capital of {} is')")
    s.add_argument("--countries_file", type=str, default=None, help="another countries list (code:a2:a3:country:capital)")
    s.add_argument("--filter", action="store_true",
                   help="keep only the facts whose top-1 next token is the attribute's first token")
    s.add_argument("--max_facts", type=int, default=None, help="use at most this many facts (after filtering)")
    s.add_argument("--output", type=str, required=True, help=output_help)
    s.add_argument("--batch_size", type=int, default=32, help="sequences per forward pass")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run from OUTPUT.partial.parquet")
    s.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in SUBCOMMANDS.values():
        s = sub.add_parser(command.name, help=command.help)
        if command.needs_model:
            add_shared_args(s)
        command.add_args(s)
    return p


def check_args(args: argparse.Namespace) -> None:
    if not SUBCOMMANDS[args.command].needs_model:
        return
    check_model_args(args)
    if args.batch_size < 1:
        raise CLIError(f"--batch_size {args.batch_size} must be >= 1")
    if args.max_facts is not None and args.max_facts < 1:
        raise CLIError(f"--max_facts {args.max_facts} must be >= 1")
    if args.facts is not None and not Path(args.facts).is_file():
        raise CLIError(f"--facts {args.facts} does not exist; pass a known_1000 JSON file")
    if args.countries_file is not None and not args.countries:
        raise CLIError("--countries_file goes with --countries")
    from fflayers.io import check_writable

    check_writable(args.output)


# ----- shared steps -------------------------------------------------------------------------------------------


def read_facts(args: argparse.Namespace) -> list:
    """The facts of ``--facts`` or ``--countries``; bad entries are reported on stderr and skipped."""
    from fflayers.recall import countries_facts, load_facts

    if args.countries:
        from fflayers.data.countries import COUNTRIES_FILE

        return countries_facts(args.countries_file or COUNTRIES_FILE)
    skipped: list[str] = []
    facts = load_facts(args.facts, skipped=skipped)
    report_skipped(skipped, "cannot be read")
    if not facts:
        raise CLIError(f"--facts {args.facts} holds no usable fact ({len(skipped)} skipped)")
    return facts


def report_skipped(messages: Sequence[str], reason: str) -> None:
    for msg in messages:
        print(f"{PROG}: skipped {' '.join(msg.split())}", file=sys.stderr)
    if messages:
        print(f"{PROG}: {len(messages)} fact(s) skipped: {reason}", file=sys.stderr)


def encoded_facts(adapter, args: argparse.Namespace, facts: list | None = None) -> list:
    """Read (unless given), encode and (with ``--filter``) filter the facts; prints what was kept and skipped."""
    from fflayers.recall import encode_facts, filter_facts

    facts = read_facts(args) if facts is None else facts
    encoded, skipped = encode_facts(adapter, facts, skip_bad=True)
    report_skipped(skipped, "cannot be encoded for this model")
    n_encoded = len(encoded)
    if args.filter:
        encoded = filter_facts(adapter, encoded, batch_size=args.batch_size)
        print(f"{PROG}: {len(encoded)} of {n_encoded} facts predicted correctly (top-1 = attribute's first token); "
              f"{n_encoded - len(encoded)} filtered out")
    if args.max_facts is not None:
        encoded = encoded[: args.max_facts]
    if not encoded:
        raise CLIError("no fact left to analyse (see the messages above); check the facts, or drop --filter")
    return encoded


def config_of(args: argparse.Namespace) -> dict:
    """The run's options (for metadata and resume checks)."""
    return {k: v for k, v in vars(args).items() if k not in ("resume", "quiet", "verbose")}


def write_output(args: argparse.Namespace, table, inputs: dict | None = None) -> None:
    """Write the table (format from the extension) and ``OUTPUT.meta.json`` (hashes of the facts file and of
    ``inputs``, name -> path)."""
    from fflayers.io import run_metadata, write_json, write_table

    write_table(args.output, table)
    inputs = ({"facts": args.facts} if getattr(args, "facts", None) else {}) | (inputs or {})
    write_json(str(args.output) + ".meta.json", run_metadata(config_of(args), inputs=inputs))


def table_over_facts(args: argparse.Namespace, encoded: list, compute: Callable, shard_facts: int = 64, unit: str = "fact"):
    """Run ``compute(encoded_part, on_facts_done) -> DataFrame`` over the facts in shards, with a progress bar;
    after each shard the rows so far go to ``OUTPUT.partial.parquet``, from which ``--resume`` continues (facts
    are matched by ``known_id``). Returns the concatenated table."""
    import pandas as pd
    from tqdm.auto import tqdm

    from fflayers.io import write_json, write_table

    partial = Path(str(args.output) + ".partial.parquet")
    partial_meta = Path(str(args.output) + ".partial.json")
    config = json.loads(json.dumps(config_of(args), default=str))
    parts = []
    done: set = set()
    if args.resume and partial.is_file():
        saved = json.loads(partial_meta.read_text()) if partial_meta.is_file() else None
        if saved != config:
            raise CLIError(f"{partial} was made with other options; rerun without --resume")
        parts.append(pd.read_parquet(partial))
        done = set(parts[0]["known_id"].tolist())
        print(f"{PROG}: resuming: {len(done)} facts already done")
    todo = [e for e in encoded if e.fact.known_id not in done]
    bar = tqdm(total=len(encoded), initial=len(encoded) - len(todo), unit=unit, desc=args.command,
               disable=args.quiet)
    for start in range(0, len(todo), shard_facts):
        parts.append(compute(todo[start : start + shard_facts], bar.update))
        if start + shard_facts < len(todo):
            write_json(partial_meta, config)
            write_table(partial, pd.concat(parts, ignore_index=True))
    bar.close()
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    order = {e.fact.known_id: i for i, e in enumerate(encoded)}
    if "known_id" in table:
        table = table.iloc[table["known_id"].map(order).argsort(kind="stable")].reset_index(drop=True)
    return table


def finish_table_run(args: argparse.Namespace, table, inputs: dict | None = None) -> None:
    """Write the result and metadata, then remove the partial files."""
    write_output(args, table, inputs)
    for suffix in (".partial.parquet", ".partial.json"):
        Path(str(args.output) + suffix).unlink(missing_ok=True)
    print(f"{PROG}: {len(table)} rows -> {args.output}")


def read_table(path: str | Path):
    """A result table by extension (.parquet, .csv, .tsv, .jsonl)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise CLIError(f"--input {path} does not exist; run the analysis first")
    readers = {".parquet": pd.read_parquet, ".csv": pd.read_csv, ".tsv": lambda p: pd.read_csv(p, sep="\t"),
               ".jsonl": lambda p: pd.read_json(p, lines=True)}
    if path.suffix.lower() not in readers:
        raise CLIError(f"--input {path}: unknown table format; use {', '.join(readers)}")
    return readers[path.suffix.lower()](path)


def check_table_output(args: argparse.Namespace) -> None:
    if Path(args.output).suffix.lower() not in TABLE_SUFFIXES:
        raise CLIError(f"--output {args.output}: give a table file ending in {', '.join(TABLE_SUFFIXES)}")


# ----- facts --------------------------------------------------------------------------------------------------


def _facts_args(s: argparse.ArgumentParser) -> None:
    """No options beyond the shared ones."""


def run_facts(args: argparse.Namespace) -> None:
    from fflayers.recall import save_facts

    if Path(args.output).suffix.lower() != ".json":
        raise CLIError(f"--output {args.output}: the facts subcommand writes known_1000 JSON; use a .json name")
    adapter = load_adapter(args)
    facts = read_facts(args)
    encoded = encoded_facts(adapter, args, facts)
    save_facts([e.fact for e in encoded], args.output)
    from fflayers.io import run_metadata, write_json

    write_json(str(args.output) + ".meta.json", run_metadata(config_of(args), inputs={"facts": args.facts} if args.facts else {}))
    print(f"{PROG}: {len(encoded)} of {len(facts)} facts kept -> {args.output}")


register(Subcommand("facts", "read, check and (with --filter) filter facts; writes known_1000 JSON",
                    _facts_args, run_facts))


# ----- knockout -----------------------------------------------------------------------------------------------


def _knockout_args(s: argparse.ArgumentParser) -> None:
    from fflayers.recall import DEFAULT_SETS, KNOCKOUT_SETS

    s.add_argument("--window", type=int, default=9, help="layers blocked around each layer (k; paper: 9)")
    s.add_argument("--sets", nargs="+", default=list(DEFAULT_SETS), choices=KNOCKOUT_SETS,
                   help="position sets whose edges from the last position are blocked")
    s.add_argument("--layers", nargs="+", type=int, default=None, help="layers to centre windows on (default: all)")


def run_knockout(args: argparse.Namespace) -> None:
    from fflayers.recall import attention_knockout, knockout_summary

    check_table_output(args)
    if args.window < 1:
        raise CLIError(f"--window {args.window} must be >= 1")
    adapter = load_adapter(args)
    encoded = encoded_facts(adapter, args)

    def compute(part, on_done):
        return attention_knockout(adapter, part, layers=args.layers, sets=args.sets, window=args.window,
                                  batch_size=args.batch_size, on_facts_done=on_done)

    table = table_over_facts(args, encoded, compute)
    finish_table_run(args, table)
    summary = knockout_summary(table)
    print("mean relative change of the predicted token's probability (%), per layer (rows) and set:")
    print(summary.to_string(float_format=lambda x: f"{x:.2f}"))


register(Subcommand("knockout", "attention knockout: block last -> subject / non-subject / last in windows of layers",
                    _knockout_args, run_knockout))


def _plot_knockout(table, args):
    from fflayers.plots import plot_knockout_curves

    return plot_knockout_curves(table, title=args.title)


PLOT_KINDS["knockout"] = _plot_knockout


# ----- projections, extraction, enrichment, sublayer knockout ---------------------------------------------------


def _final_norm_arg(s: argparse.ArgumentParser, default: bool, what: str) -> None:
    g = s.add_mutually_exclusive_group()
    g.add_argument("--final_norm", dest="final_norm", action="store_true",
                   help=f"read {what} through the model's final norm{' (default)' if default else ''}")
    g.add_argument("--no_final_norm", dest="final_norm", action="store_false",
                   help=f"read {what} without the final norm{'' if default else ' (default)'}")
    s.set_defaults(final_norm=default)


def _layers_arg(s: argparse.ArgumentParser, help_text: str = "layers (default: all; negative counts from the top)") -> None:
    s.add_argument("--layers", nargs="+", type=int, default=None, help=help_text)


def _project_args(s: argparse.ArgumentParser) -> None:
    from fflayers.recall import POSITION_NAMES
    from fflayers.recall.projection import PROJECTABLE_POINTS

    s.add_argument("--points", nargs="+", default=["resid_post", "attn_out", "mlp_out"], choices=PROJECTABLE_POINTS,
                   help="hook points to read in the vocabulary")
    _layers_arg(s)
    s.add_argument("--positions", nargs="+", default=["last"],
                   help=f"positions: {', '.join(POSITION_NAMES)} or token indices (negative from the end)")
    s.add_argument("-k", "--k", type=int, default=10, help="top tokens per vector")
    _final_norm_arg(s, True, "the vectors")


def run_project(args: argparse.Namespace) -> None:
    from fflayers.recall import vocabulary_projections

    check_table_output(args)
    if args.k < 1:
        raise CLIError(f"--k {args.k} must be >= 1")
    adapter = load_adapter(args)
    encoded = encoded_facts(adapter, args)

    def compute(part, on_done):
        table = vocabulary_projections(adapter, part, points=args.points, layers=args.layers,
                                       positions=args.positions, k=args.k, final_norm=args.final_norm,
                                       batch_size=args.batch_size)
        on_done(len(part))
        return table

    table = table_over_facts(args, encoded, compute)
    finish_table_run(args, table)
    first = table[(table["known_id"] == table["known_id"].iloc[0]) & (table["rank"] == 1)]
    grid = first.pivot_table(index="layer", columns=["point", "position"], values="token", aggfunc="first")
    print(f"top-1 token per layer for fact {encoded[0].fact.known_id!r} ({encoded[0].fact.prompt!r} -> "
          f"{encoded[0].fact.attribute!r}):")
    print(grid.to_string())


register(Subcommand("project", "top-k vocabulary tokens of hidden states and sublayer outputs at chosen positions",
                    _project_args, run_project))


def _extraction_args(s: argparse.ArgumentParser) -> None:
    from fflayers.recall import EXTRACTION_VARIANTS

    s.add_argument("--variants", nargs="+", default=["none"], choices=EXTRACTION_VARIANTS,
                   help="the model as it is (none), attention edges from the last position blocked in all layers "
                        "(block_subject, block_non_subject, block_last), subject states frozen after --patch_layer "
                        "(patch_subject)")
    s.add_argument("--patch_layer", type=int, default=0, help="patch_subject: the block whose subject states are kept")
    _final_norm_arg(s, False, "the sublayer outputs")


def run_extraction(args: argparse.Namespace) -> None:
    from fflayers.recall import extraction_events, extraction_overview

    check_table_output(args)
    adapter = load_adapter(args)
    if "patch_subject" in args.variants:
        adapter.check_layer(args.patch_layer)
    encoded = encoded_facts(adapter, args)

    def compute(part, on_done):
        table = extraction_events(adapter, part, variants=args.variants, patch_layer=args.patch_layer,
                                  final_norm=args.final_norm, batch_size=args.batch_size)
        on_done(len(part))
        return table

    table = table_over_facts(args, encoded, compute)
    finish_table_run(args, table)
    print("extraction events (attribute = top-1 of the sublayer output at the last position):")
    print(extraction_overview(table).to_string(index=False, float_format=lambda x: f"{x:.3f}"))


register(Subcommand("extraction", "attribute extraction events of MHSA and MLP sublayers at the last position",
                    _extraction_args, run_extraction))


def _rate_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--paragraphs", type=str, required=True,
                   help="corpus whose lines are paragraphs (WikiText .tokens, text or .jsonl); a paragraph is about "
                        "a subject when it mentions it as whole words")
    s.add_argument("--paragraphs_format", default="auto", choices=["auto", "wikitext", "text", "jsonl"],
                   help="format of --paragraphs (auto: by extension)")
    s.add_argument("--top", type=int, default=500, help="top tokens of the projection to filter")
    s.add_argument("--keep", type=int, default=50, help="tokens kept after dropping stopwords and short tokens")
    _final_norm_arg(s, True, "hidden states")


def _read_rate_inputs(adapter, args: argparse.Namespace):
    from fflayers.recall import AttributeScorer, read_paragraphs

    if args.top < 1 or args.keep < 1:
        raise CLIError(f"--top {args.top} and --keep {args.keep} must be >= 1")
    if not Path(args.paragraphs).is_file():
        raise CLIError(f"--paragraphs {args.paragraphs} does not exist; pass a corpus file (one paragraph per line)")
    paragraphs = read_paragraphs(args.paragraphs, fmt=args.paragraphs_format)
    return paragraphs, AttributeScorer(adapter, top=args.top, keep=args.keep, final_norm=args.final_norm)


def _report_without_paragraphs(table) -> None:
    missing = table.loc[table["n_paragraphs"] == 0, "subject"].unique()
    if len(missing):
        print(f"{PROG}: {len(missing)} subject(s) have no paragraph in --paragraphs (rate NaN): "
              f"{', '.join(map(str, missing[:10]))}{' ...' if len(missing) > 10 else ''}")


def _enrichment_args(s: argparse.ArgumentParser) -> None:
    from fflayers.recall import POSITION_NAMES

    _rate_args(s)
    _layers_arg(s)
    s.add_argument("--positions", nargs="+", default=["subject_last"],
                   help=f"positions: {', '.join(POSITION_NAMES)} or token indices")
    s.add_argument("--no_baseline", action="store_true", help="skip the subject-embedding baseline")


def run_enrichment(args: argparse.Namespace) -> None:
    from fflayers.recall import attributes_rate, attributes_rate_summary

    check_table_output(args)
    adapter = load_adapter(args)
    paragraphs, scorer = _read_rate_inputs(adapter, args)
    encoded = encoded_facts(adapter, args)

    def compute(part, on_done):
        table = attributes_rate(adapter, part, paragraphs, layers=args.layers, positions=args.positions,
                                baseline=not args.no_baseline, batch_size=args.batch_size, scorer=scorer)
        on_done(len(part))
        return table

    table = table_over_facts(args, encoded, compute)
    finish_table_run(args, table, inputs={"paragraphs": args.paragraphs})
    _report_without_paragraphs(table)
    print("mean attributes rate per layer (layer -1: subject embedding):")
    print(attributes_rate_summary(table).to_string(index=False, float_format=lambda x: f"{x:.3f}"))


register(Subcommand("enrichment", "subject enrichment: attributes rate of hidden states per layer",
                    _enrichment_args, run_enrichment))


def _sublayer_knockout_args(s: argparse.ArgumentParser) -> None:
    from fflayers.recall import KNOCKOUT_KINDS

    _rate_args(s)
    s.add_argument("--kinds", nargs="+", default=list(KNOCKOUT_KINDS), choices=list(KNOCKOUT_KINDS),
                   help="sublayers to knock out (mlp_out or attn_out set to zero)")
    s.add_argument("--window", type=int, default=10, help="knock out layers [s, s + window] (clipped; paper: 10)")
    s.add_argument("--starts", nargs="+", type=int, default=None, help="first knocked-out layers (default: all)")
    _layers_arg(s, "layers whose subject state is measured (default: the last)")
    s.add_argument("--position", default="subject_last", help="position whose state is measured")


def run_sublayer_knockout(args: argparse.Namespace) -> None:
    from fflayers.recall import sublayer_knockout, sublayer_knockout_summary

    check_table_output(args)
    if args.window < 0:
        raise CLIError(f"--window {args.window} must be >= 0")
    adapter = load_adapter(args)
    paragraphs, scorer = _read_rate_inputs(adapter, args)
    encoded = encoded_facts(adapter, args)

    def compute(part, on_done):
        table = sublayer_knockout(adapter, part, paragraphs, kinds=args.kinds, window=args.window,
                                  starts=args.starts, layers=args.layers, position=args.position,
                                  batch_size=args.batch_size, scorer=scorer)
        on_done(len(part))
        return table

    table = table_over_facts(args, encoded, compute, shard_facts=16)
    finish_table_run(args, table, inputs={"paragraphs": args.paragraphs})
    _report_without_paragraphs(table)
    print("mean attributes rate and attribute probability per knockout window (kind none: the unedited model):")
    print(sublayer_knockout_summary(table).to_string(index=False, float_format=lambda x: f"{x:.3f}"))


register(Subcommand("sublayer-knockout", "attributes rate and attribute probability with MLP / MHSA sublayers "
                    "knocked out in windows of layers", _sublayer_knockout_args, run_sublayer_knockout))


def _plot_extraction(table, args):
    from fflayers.plots import plot_extraction_rates

    return plot_extraction_rates(table, title=args.title)


def _plot_enrichment(table, args):
    from fflayers.plots import plot_attributes_rate

    return plot_attributes_rate(table, title=args.title)


def _plot_sublayer_knockout(table, args):
    from fflayers.plots import plot_sublayer_knockout

    return plot_sublayer_knockout(table, title=args.title)


PLOT_KINDS["extraction"] = _plot_extraction
PLOT_KINDS["enrichment"] = _plot_enrichment
PLOT_KINDS["sublayer-knockout"] = _plot_sublayer_knockout


# ----- plot (keep last: it lists every registered kind) ------------------------------------------------------


def _plot_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--kind", required=True, help="which figure: " + ", ".join(PLOT_KINDS))
    s.add_argument("--input", required=True, help="the analysis' table")
    s.add_argument("--output", required=True, help="figure path without extension (writes .png and .pdf)")
    s.add_argument("--title", default=None, help="figure title (default: the paper's)")


def run_plot(args: argparse.Namespace) -> None:
    from fflayers.plots import save_figure

    if args.kind not in PLOT_KINDS:
        raise CLIError(f"--kind {args.kind!r} is unknown; choose from {', '.join(PLOT_KINDS)}")
    table = read_table(args.input)
    written = save_figure(PLOT_KINDS[args.kind](table, args), args.output)
    print(f"{PROG}: wrote {', '.join(str(p) for p in written)}")


def run(args: argparse.Namespace) -> None:
    check_args(args)
    start = time.time()
    SUBCOMMANDS[args.command].run(args)
    if SUBCOMMANDS[args.command].needs_model:
        print(f"{PROG}: {args.command} done in {time.time() - start:.1f} s")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for bad input, with one line on stderr)."""
    if "plot" not in SUBCOMMANDS:
        register(Subcommand("plot", "draw a result table's figure (PNG and PDF)", _plot_args, run_plot,
                            needs_model=False))
    return run_main(PROG, build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
