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
``results_summary.tsv``; the figure ``results.png`` / ``.pdf``; ``results.meta.json``. Each finished fact is
saved atomically in ``results.parts/``; ``--resume`` skips those. Under torchrun each rank takes its share of
the facts and rank 0 merges and writes the outputs (the same as a one-process run). Bad input: one line, exit
2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
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

__all__ = ["PROG", "build_parser", "check_args", "run", "main", "command"]

PROG = "knowledge_neurons.py"


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
    p.add_argument("--resume", action="store_true", help="skip the facts already saved in OUTPUT.parts/")
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


def run_key(args: argparse.Namespace, config, facts) -> str:
    """What a saved fact depends on: model, search settings and the whole fact list (unrelated facts)."""
    model = {k: getattr(args, k) for k in ("model_dir", "hf_model", "gguf_file")}
    blob = json.dumps([model, config.to_json(), [f.to_json() for f in facts]], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def part_path(parts: Path, uuid: str) -> Path:
    return parts / f"{hashlib.sha1(uuid.encode()).hexdigest()[:16]}.json"


def load_parts(parts: Path, facts, key: str) -> dict[int, dict]:
    """Saved records of this run (``--resume``), by fact index; parts of another run are an error."""
    done = {}
    for i, fact in enumerate(facts):
        path = part_path(parts, fact.uuid)
        if not path.is_file():
            continue
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue  # unreadable: computed again
        if saved.get("key") != key:
            raise CLIError(f"{path} was made with another model, settings or fact list; "
                           "rerun without --resume")
        done[i] = saved["record"]
    return done


def write_outputs(out: Path, records: list[dict], config, args) -> None:
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
    write_json(out, {"summary": summarize(records), "config": config.to_json(), "facts": facts})
    inputs = {"facts": args.facts} if args.facts else {}
    write_json(stem.with_suffix(".meta.json"), run_metadata(dict(vars(args)), inputs=inputs))
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
    from fflayers.io import check_folder_writable, write_json
    from fflayers.neurons.evaluate import evaluate_facts, summarize

    check_args(args)
    start = time.time()
    out = Path(args.output)
    check_folder_writable(out.parent)
    info = dist.dist_info()
    device = dist.rank_device(info, args.device)
    dist.init_distributed(device)
    try:
        args.device = str(device)
        adapter = load_adapter(args)
        for layer in args.layers or ():
            adapter.check_layer(layer)
        mask = adapter.vocab.mask_token if adapter.is_masked_lm else None
        facts = load_facts(args, mask)
        if not facts:
            raise CLIError("no facts left after --relations / --max_facts; loosen the filters")
        config = _search_config(args)
        key = run_key(args, config, facts)
        parts = out.with_suffix(".parts")
        if info.is_main:
            parts.mkdir(exist_ok=True)
            if not args.resume:
                for stale in parts.glob("*.json"):
                    stale.unlink()
        dist.barrier()
        done = load_parts(parts, facts, key) if args.resume else {}
        todo = [i for i in range(len(facts)) if i not in done]
        mine = [todo[j] for j in dist.shard_range(len(todo), info.rank, info.world_size)]
        if info.is_main and done:
            print(f"{prog_name()}: resuming: {len(done)} of {len(facts)} facts already done")

        def save(i: int, record: dict) -> None:
            write_json(part_path(parts, facts[i].uuid), {"key": key, "record": record})

        records = evaluate_facts(adapter, facts, config, indices=mine,
                                 progress=info.is_main and not args.quiet, on_record=save)
        gathered = dist.gather_objects(list(zip(mine, records, strict=True)))
        if info.is_main:
            for part in gathered:
                done.update(dict(part))
            ordered = [done[i] for i in range(len(facts))]
            write_outputs(out, ordered, config, args)
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
