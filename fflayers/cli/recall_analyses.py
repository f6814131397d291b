"""The analyses of ``recall`` (``dissect_recall.py``): facts, knockout, project, extraction, enrichment and
sublayer-knockout, each with its options, its run and (for the tables) its figure."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fflayers.cli.common import CLIError, load_adapter, prog_name
from fflayers.cli.recall_base import Subcommand, encoded_facts, read_facts
from fflayers.cli.recall_configs import table_config
from fflayers.cli.tables import check_table_output, finish_table_run, register_table_kind, table_over_facts

if TYPE_CHECKING:
    from fflayers.backends.base import LMAdapter

__all__ = ["ANALYSES", "FACTS_PER_UNIT", "PLOT_KINDS", "run_kind", "run_table"]

#: the model subcommands, in the order of ``--help``
ANALYSES: list[Subcommand] = []
#: plot kind -> function drawing a Figure from a table and the args
PLOT_KINDS: dict[str, Callable] = {}
#: table subcommand -> facts per unit (and shard) of its runs; part of the resume key
FACTS_PER_UNIT: dict[str, int] = {"knockout": 64, "project": 64, "extraction": 64, "enrichment": 64,
                                  "sublayer-knockout": 16}


def run_kind(name: str) -> str:
    """The run kind (manifest, merge) of the table subcommand ``name``: ``recall-NAME``."""
    return f"recall-{name}"


def register(command: Subcommand) -> Subcommand:
    """Add a model subcommand (and, for a table subcommand, the merge of its run kind)."""
    ANALYSES.append(command)
    if command.name in FACTS_PER_UNIT:
        register_table_kind(run_kind(command.name))
    return command


def run_table(args: argparse.Namespace, adapter: LMAdapter, encoded: list, compute: Callable,
              inputs: dict | None = None) -> Any:
    """The table of ``compute`` over the facts (see :func:`fflayers.cli.tables.table_over_facts`), written
    with its metadata on rank 0; None on the other ranks. The subcommand's config
    (:func:`fflayers.cli.recall_configs.table_config`) is the resume key and the metadata's config."""
    config = table_config(args)
    table = table_over_facts(args, adapter, encoded, compute, kind=run_kind(args.command), config=config,
                             facts_per_unit=FACTS_PER_UNIT[args.command], inputs=inputs)
    if table is not None:
        finish_table_run(args, table, config, inputs=inputs)
    return table


# ----- facts ------------------------------------------------------------------------------------------------


def _facts_args(s: argparse.ArgumentParser) -> None:
    """No options beyond the shared ones."""


def run_facts(args: argparse.Namespace) -> None:
    from fflayers.recall import save_facts

    if Path(args.output).suffix.lower() != ".json":
        raise CLIError(f"--output {args.output}: the facts subcommand writes known_1000 JSON; "
                       "use a .json name")
    adapter = load_adapter(args)
    facts = read_facts(args)
    encoded = encoded_facts(adapter, args, facts)
    from fflayers.distributed import dist_info
    from fflayers.io import run_metadata, write_json

    if not dist_info().is_main:  # under torchrun, rank 0 writes
        return
    save_facts([e.fact for e in encoded], args.output)
    write_json(str(args.output) + ".meta.json",
               run_metadata({k: v for k, v in vars(args).items() if k not in ("resume", "quiet", "verbose")},
                            inputs={"facts": args.facts} if args.facts else {}))
    print(f"{prog_name()}: {len(encoded)} of {len(facts)} facts kept -> {args.output}")


register(Subcommand("facts", "read, check and (with --filter) filter facts; writes known_1000 JSON",
                    _facts_args, run_facts))


# ----- knockout ---------------------------------------------------------------------------------------------


def _knockout_args(s: argparse.ArgumentParser) -> None:
    from fflayers.recall import DEFAULT_SETS, KNOCKOUT_SETS

    s.add_argument("--window", type=int, default=9, help="layers blocked around each layer (k; paper: 9)")
    s.add_argument("--sets", nargs="+", default=list(DEFAULT_SETS), choices=KNOCKOUT_SETS,
                   help="position sets whose edges from the last position are blocked")
    s.add_argument("--layers", nargs="+", type=int, default=None,
                   help="layers to centre windows on (default: all)")


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

    table = run_table(args, adapter, encoded, compute)
    if table is None:
        return
    summary = knockout_summary(table)
    print("mean relative change of the predicted token's probability (%), per layer (rows) and set:")
    print(summary.to_string(float_format=lambda x: f"{x:.2f}"))


register(Subcommand("knockout",
                    "attention knockout: block last -> subject / non-subject / last in windows of layers",
                    _knockout_args, run_knockout))


def _plot_knockout(table, args):
    from fflayers.plots import plot_knockout_curves

    return plot_knockout_curves(table, title=args.title)


PLOT_KINDS["knockout"] = _plot_knockout


# ----- projections, extraction, enrichment, sublayer knockout -----------------------------------------------


def _final_norm_arg(s: argparse.ArgumentParser, default: bool, what: str) -> None:
    g = s.add_mutually_exclusive_group()
    g.add_argument("--final_norm", dest="final_norm", action="store_true",
                   help=f"read {what} through the model's final norm{' (default)' if default else ''}")
    g.add_argument("--no_final_norm", dest="final_norm", action="store_false",
                   help=f"read {what} without the final norm{'' if default else ' (default)'}")
    s.set_defaults(final_norm=default)


def _layers_arg(s: argparse.ArgumentParser,
                help_text: str = "layers (default: all; negative counts from the top)") -> None:
    s.add_argument("--layers", nargs="+", type=int, default=None, help=help_text)


def _project_args(s: argparse.ArgumentParser) -> None:
    from fflayers.recall import POSITION_NAMES
    from fflayers.recall.projection import PROJECTABLE_POINTS

    s.add_argument("--points", nargs="+", default=["resid_post", "attn_out", "mlp_out"],
                   choices=PROJECTABLE_POINTS,
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

    table = run_table(args, adapter, encoded, compute)
    if table is None:
        return
    first = table[(table["known_id"] == table["known_id"].iloc[0]) & (table["rank"] == 1)]
    grid = first.pivot_table(index="layer", columns=["point", "position"], values="token", aggfunc="first")
    print(f"top-1 token per layer for fact {encoded[0].fact.known_id!r} ({encoded[0].fact.prompt!r} -> "
          f"{encoded[0].fact.attribute!r}):")
    print(grid.to_string())


register(Subcommand("project",
                    "top-k vocabulary tokens of hidden states and sublayer outputs at chosen positions",
                    _project_args, run_project))


def _extraction_args(s: argparse.ArgumentParser) -> None:
    from fflayers.recall import EXTRACTION_VARIANTS

    s.add_argument("--variants", nargs="+", default=["none"], choices=EXTRACTION_VARIANTS,
                   help="the model as it is (none), attention edges from the last position blocked in all "
                        "layers (block_subject, block_non_subject, block_last), subject states frozen after "
                        "--patch_layer (patch_subject)")
    s.add_argument("--patch_layer", type=int, default=0,
                   help="patch_subject: the block whose subject states are kept")
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

    table = run_table(args, adapter, encoded, compute)
    if table is None:
        return
    print("extraction events (attribute = top-1 of the sublayer output at the last position; *_topk_any: "
          "share of facts with the attribute in the top 10 in some layer):")
    print(extraction_overview(table).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    if not table["event"].any():
        n_facts = table["known_id"].nunique()
        print(f"no top-1 extraction event in any layer for these {n_facts} facts; see the top-10 shares"
              + ("" if args.final_norm else ", or try --final_norm"))


register(Subcommand("extraction",
                    "attribute extraction events of MHSA and MLP sublayers at the last position",
                    _extraction_args, run_extraction))


def _rate_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--paragraphs", type=str, required=True,
                   help="corpus whose lines are paragraphs (WikiText .tokens, text or .jsonl); a paragraph "
                        "is about a subject when it mentions it as whole words")
    s.add_argument("--paragraphs_format", default="auto", choices=["auto", "wikitext", "text", "jsonl"],
                   help="format of --paragraphs (auto: by extension)")
    s.add_argument("--top", type=int, default=500, help="top tokens of the projection to filter")
    s.add_argument("--keep", type=int, default=50,
                   help="tokens kept after dropping stopwords and short tokens")
    _final_norm_arg(s, True, "hidden states")


def _read_rate_inputs(adapter, args: argparse.Namespace):
    from fflayers.recall import AttributeScorer, read_paragraphs

    if args.top < 1 or args.keep < 1:
        raise CLIError(f"--top {args.top} and --keep {args.keep} must be >= 1")
    if not Path(args.paragraphs).is_file():
        raise CLIError(f"--paragraphs {args.paragraphs} does not exist; "
                       "pass a corpus file (one paragraph per line)")
    paragraphs = read_paragraphs(args.paragraphs, fmt=args.paragraphs_format)
    return paragraphs, AttributeScorer(adapter, top=args.top, keep=args.keep, final_norm=args.final_norm)


def _report_without_paragraphs(table) -> None:
    missing = table.loc[table["n_paragraphs"] == 0, "subject"].unique()
    if len(missing):
        print(f"{prog_name()}: {len(missing)} subject(s) have no paragraph in --paragraphs (rate NaN): "
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

    table = run_table(args, adapter, encoded, compute, inputs={"paragraphs": args.paragraphs})
    if table is None:
        return
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
    s.add_argument("--window", type=int, default=10,
                   help="knock out layers [s, s + window] (clipped; paper: 10)")
    s.add_argument("--starts", nargs="+", type=int, default=None,
                   help="first knocked-out layers (default: all)")
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

    table = run_table(args, adapter, encoded, compute, inputs={"paragraphs": args.paragraphs})
    if table is None:
        return
    _report_without_paragraphs(table)
    print("mean attributes rate and attribute probability per knockout window "
          "(kind none: the unedited model):")
    print(sublayer_knockout_summary(table).to_string(index=False, float_format=lambda x: f"{x:.3f}"))


register(Subcommand("sublayer-knockout",
                    "attributes rate and attribute probability with MLP / MHSA sublayers "
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
