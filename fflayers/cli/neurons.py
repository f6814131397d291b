"""Knowledge neurons (Dai et al. 2021): refined neurons of each fact and the effect of suppressing / enhancing
them.

    fflayers neurons --hf_model bert-base-uncased --facts pararel.jsonl --output kn/results.json
    fflayers neurons --hf_model FOLDER --gguf_file smollm2.gguf --countries --max_facts 40 \\
        --output kn/results.json --steps 20 --batch_size 60
    torchrun --nproc_per_node 4 analysis/knowledge_neurons.py ... --resume

(``python analysis/knowledge_neurons.py ...`` is the same.) Facts come from ``--facts`` (PARAREL-like jsonl:
uuid, relation, prompts, answer; masked LMs: prompts with the mask token) or ``--countries`` (country ->
capital and capital -> country paraphrases from the offline countries list). For each fact the refined neurons
of its prompts are found by integrated gradients, then suppressed (activation 0) and enhanced (doubled) on its
own prompts (related), on another relation's fact (unrelated) and, as a baseline, as many random neurons of
the same layers are suppressed / enhanced on the related prompts.

Outputs next to ``--output`` (``results.json``): the JSON summary per relation (% change of the correct
answer's probability) with every fact's neurons; ``results.tsv`` (one row per fact x intervention x prompt);
``results_summary.tsv``; the figure ``results.png`` / ``.pdf``; ``results.meta.json``.

The facts are the units of a :mod:`fflayers.runs` run (kind ``neurons``, shards of about
:data:`SHARD_FACTS` facts). With ``--resume`` the finished shards are kept in the run folder
``results.json.ckpt/`` (manifest and shard files), a rerun computes only the others, whatever killed the
earlier run, and the folder is removed once the outputs are written; a folder of other settings, another
model or another content of the facts (or countries) file is refused, naming what differs. Without
``--resume`` nothing but the outputs is written. Under torchrun the ranks split the shards and rank 0 merges
and writes the outputs (the same as a one-process run). Bad input: one line, exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

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
    where_of,
)

__all__ = ["PROG", "FactsRunConfig", "SHARD_FACTS", "build_parser", "check_args", "resume_config",
           "input_fingerprints", "run", "main", "command"]

PROG = "knowledge_neurons.py"
#: Facts per shard of a run folder (at least four shards per worker): what a killed run loses at most.
SHARD_FACTS = 8

if TYPE_CHECKING:
    from fflayers.neurons.evaluate import SearchConfig


@dataclass(frozen=True)
class FactsRunConfig:
    """What a run's results depend on besides the model and the facts file (their fingerprints): which facts
    (``--countries``, ``--relations`` as a sorted set, ``--max_facts`` per relation) and how neurons are
    searched. Its ``asdict`` is the resume key and the metadata's config."""

    search: SearchConfig
    countries: bool = False
    relations: tuple[str, ...] | None = None
    max_facts: int | None = None


def build_parser(prog: str = PROG, epilog: str | None = None) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=epilog)
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--facts", type=str, help="PARAREL-like jsonl (uuid, relation, prompts, answer)")
    src.add_argument("--countries", action="store_true",
                     help="country/capital paraphrase facts (offline list)")
    p.add_argument("--countries_file", type=str, default=None,
                   help="countries list (default: Debian miscfiles')")
    p.add_argument("--relations", nargs="+", default=None, help="keep only these relations")
    p.add_argument("--max_facts", type=int, default=None,
                   help="at most this many facts per relation (file order)")
    p.add_argument("--output", type=str, required=True,
                   help="results JSON (tables and figure written beside it)")
    p.add_argument("--steps", type=int, default=20, help="integrated-gradients steps")
    p.add_argument("--batch_size", type=int, default=10, help="(layer, step) rows per forward/backward pass")
    p.add_argument("--p", type=float, default=0.5, help="share of prompts a refined neuron must exceed")
    cut = p.add_mutually_exclusive_group()
    cut.add_argument("--adaptive_threshold", type=float, default=None,
                     help="coarse cut: this times the largest attribution (default 0.3)")
    cut.add_argument("--threshold", type=float, default=None, help="coarse cut: absolute attribution")
    cut.add_argument("--percentile", type=float, default=None,
                     help="coarse cut: percentile of all attributions")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="search only these layers (default: all; fewer layers are faster)")
    p.add_argument("--convention", choices=("paper", "kn-package"), default="paper",
                   help="attribution convention of KnowledgeNeurons")
    p.add_argument("--seed", type=int, default=0, help="unrelated facts and random neurons")
    p.add_argument("--no_random", action="store_true", help="skip the random-neuron baseline")
    p.add_argument("--resume", action="store_true",
                   help="keep finished facts in OUTPUT.ckpt/ and compute only the others")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def check_args(args: argparse.Namespace) -> None:
    check_model_args(args)
    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name} {getattr(args, name)} must be >= 1")
    if args.max_facts is not None and args.max_facts < 1:
        raise CLIError(f"--max_facts {args.max_facts} must be >= 1")
    if not 0.0 <= args.p < 1.0:
        raise CLIError(f"--p {args.p} must be in [0, 1)")
    check_range(args, "adaptive_threshold", 0.0, 1.0, low_open=True,
                why="it is a share of the largest attribution")
    check_range(args, "threshold", 0.0, low_open=True, why="a cut at or below 0 keeps every neuron")
    check_range(args, "percentile", 0.0, 100.0, low_open=True, high_open=True)
    if args.adaptive_threshold is None and args.threshold is None and args.percentile is None:
        args.adaptive_threshold = 0.3
    if Path(args.output).suffix != ".json":
        raise CLIError(f"--output {args.output} must end in .json (tables and figures are written beside it)")
    if not Path(args.output).parent.is_dir():
        raise CLIError(f"the folder of --output {args.output} does not exist; create it first")


def load_facts(args: argparse.Namespace, mask_token: str | None):
    from fflayers.neurons.facts import countries_paraphrases, read_facts

    facts = (read_facts(args.facts) if args.facts
             else countries_paraphrases(countries_file=args.countries_file, mask_token=mask_token))
    if args.relations:
        missing = sorted(set(args.relations) - {f.relation for f in facts})
        if missing:
            raise CLIError(f"--relations {' '.join(missing)} not in the facts; they hold "
                           f"{' '.join(sorted({f.relation for f in facts}))}")
        facts = [f for f in facts if f.relation in args.relations]
    if args.max_facts:
        kept, count = [], {}
        for f in facts:
            count[f.relation] = count.get(f.relation, 0) + 1
            if count[f.relation] <= args.max_facts:
                kept.append(f)
        facts = kept
    return facts


def _search_config(args: argparse.Namespace):
    from fflayers.neurons.evaluate import SearchConfig

    return SearchConfig(steps=args.steps, batch_size=args.batch_size, p=args.p,
                        coarse_adaptive_threshold=args.adaptive_threshold, coarse_threshold=args.threshold,
                        coarse_percentile=args.percentile, convention=args.convention, seed=args.seed,
                        random_baseline=not args.no_random,
                        layers=None if args.layers is None else tuple(args.layers))


def resume_config(args: argparse.Namespace) -> FactsRunConfig:
    """The run's :class:`FactsRunConfig` from the parsed options."""
    relations = None if args.relations is None else tuple(sorted(set(args.relations)))
    return FactsRunConfig(_search_config(args), args.countries, relations, args.max_facts)


def input_fingerprints(args: argparse.Namespace, adapter) -> dict[str, str]:
    """Content digests of what the run reads: the model, and the facts file or the countries list."""
    from fflayers.runs import file_digest, model_fingerprint

    if args.facts:
        source = {"facts": file_digest(args.facts)}
    else:
        from fflayers.data.countries import COUNTRIES_FILE

        source = {"countries_file": file_digest(args.countries_file or COUNTRIES_FILE)}
    return {"model": model_fingerprint(adapter), **source}


def write_outputs(out: Path, records: list[dict], config: FactsRunConfig, args) -> None:
    from fflayers.io import run_metadata, write_json, write_table
    from fflayers.neurons.evaluate import results_table, summarize, summary_table
    from fflayers.plots import plot_knowledge_neuron_effects, save_figure

    table = results_table(records)
    summary = summary_table(table)
    stem = out.with_suffix("")
    write_table(stem.with_suffix(".tsv"), table)
    write_table(Path(f"{stem}_summary.tsv"), summary)
    facts = [{k: r[k] for k in ("uuid", "relation", "answer", "neurons", "random_neurons", "unrelated_uuid")}
             for r in records]
    write_json(out, {"summary": summarize(records), "config": config.search.to_json(), "facts": facts})
    inputs = {"facts": args.facts} if args.facts else {}
    meta = run_metadata(dataclasses.asdict(config), inputs=inputs) | {"where": where_of(args)}
    write_json(stem.with_suffix(".meta.json"), meta)
    if len(summary):
        save_figure(plot_knowledge_neuron_effects(summary), stem)


def print_summary(summary: dict) -> None:
    def fmt(x) -> str:
        return "   n/a" if x is None else f"{x:+6.1f}"

    print(f"{'relation':<22} {'facts':>5} {'neurons':>7}  suppress: related unrelated random | "
          "enhance: related unrelated random")
    for relation, e in summary.items():
        s, n = e["suppress"], e["enhance"]
        print(f"{relation:<22} {e['n_facts']:>5} {e['mean_neurons']:>7.1f}  {fmt(s.get('related')):>16} "
              f"{fmt(s.get('unrelated')):>9} {fmt(s.get('random_related')):>6} | {fmt(n.get('related')):>15} "
              f"{fmt(n.get('unrelated')):>9} {fmt(n.get('random_related')):>6}")


def run(args: argparse.Namespace) -> None:
    from fflayers import distributed as dist
    from fflayers.io import check_folder_writable
    from fflayers.neurons.evaluate import KIND, FactsTask, summarize
    from fflayers.runs import run_units

    check_args(args)
    start = time.time()
    out = Path(args.output)
    check_folder_writable(out.parent)
    info = dist.dist_info()
    device = dist.join_ranks(info, args.device)
    try:
        args.device = str(device)
        adapter = load_adapter(args)
        for layer in args.layers or ():
            adapter.check_layer(layer)
        mask = adapter.vocab.mask_token if adapter.is_masked_lm else None
        facts = load_facts(args, mask)
        if not facts:
            raise CLIError("no facts left after --relations / --max_facts; loosen the filters")
        config = resume_config(args)
        task = FactsTask(adapter, facts, config.search)
        run_dir = Path(f"{out}.ckpt") if args.resume else None
        done = run_units(task, config, kind=KIND, run_dir=run_dir,
                         fingerprints=input_fingerprints(args, adapter), unit_name="facts",
                         shard_weight=SHARD_FACTS, progress=info.is_main and not args.quiet, desc="facts")
        computed = sum(dist.gather_objects(task.evaluated))
        if info.is_main:
            if args.resume:
                print(f"{prog_name()}: {done.plan['n_shards']} shards of {len(facts)} facts: computed "
                      f"{computed}, reused {len(facts) - computed} from {run_dir}")
            ordered = done.result.pieces()
            write_outputs(out, ordered, config, args)
            if run_dir is not None:
                shutil.rmtree(run_dir, ignore_errors=True)
            print_summary(summarize(ordered))
            print(f"{prog_name()}: {len(facts)} facts in {time.time() - start:.1f} s -> {out}")
        dist.barrier()
    finally:
        dist.finish()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``knowledge_neurons.py``; returns the exit code (2 for bad input, one stderr line)."""
    return run_main(PROG, build_parser, run, argv)


def command(argv: Sequence[str] | None, prog: str, epilog: str | None = None) -> int:
    """``fflayers neurons``: the same, named ``prog``."""
    return run_command(prog, build_parser, run, argv, epilog)
