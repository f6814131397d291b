"""PARAREL-style evaluation of knowledge neurons (Dai et al. 2021, figures 3 and 4).

For each fact: its refined neurons (all its prompts), then the change of the correct answer's probability when
those neurons are suppressed (activation 0) or enhanced (doubled) on

* ``related`` prompts: the fact's own prompts, and
* ``unrelated`` prompts: the prompts of a fact of another relation (as in the paper), with another answer
  where there is one; a fact whose relation is the only one in the facts falls back to another fact of its
  own relation (another answer), with an :class:`UnrelatedFallbackWarning` naming both
  (:func:`pick_unrelated`); the package's facts of nine relations
  (:func:`fflayers.neurons.facts.load_relations`) always have another relation,

plus a baseline: as many random neurons of the same layers (none of them refined), on the related prompts.
The change is ``100 * (after - before) / before`` per prompt, averaged over each fact's prompts, then over
the facts of a relation (facts without refined neurons are kept in the table but not averaged).
Paper (BERT-base, PARAREL): suppress -37% related / -0.4% unrelated; enhance +46% / -0.2%.

Every choice (unrelated fact, random neurons) is seeded by ``seed`` and the fact's uuid, so a fact's record
does not depend on which other facts run, in which order, or on which torchrun rank. :class:`FactsTask` makes
the facts the units of a :mod:`fflayers.runs` run (kind ``neurons``, records merged by fact index).
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import pandas as pd

from fflayers.backends.base import LMAdapter
from fflayers.core import FflayersError, InputError
from fflayers.neurons.facts import ParaphraseFact
from fflayers.neurons.modify import enhance_knowledge, suppress_knowledge
from fflayers.runs import PiecesTask, UnitPieces, merge_piece_states, register_merge

#: The analysis's name in run folders and partials (:mod:`fflayers.runs`).
KIND = "neurons"
INTERVENTIONS = {"suppress": suppress_knowledge, "enhance": enhance_knowledge}
ROW_COLUMNS = ["uuid", "relation", "intervention", "prompts", "neurons", "n_neurons", "prompt", "answer",
               "before", "after", "change_pct"]


@dataclass(frozen=True)
class SearchConfig:
    """How refined neurons are found (:meth:`KnowledgeNeurons.get_refined_neurons`) and the baseline
    seeded."""

    steps: int = 20
    batch_size: int = 10
    p: float = 0.5
    coarse_adaptive_threshold: float | None = 0.3
    coarse_threshold: float | None = None
    coarse_percentile: float | None = None
    convention: str = "paper"
    seed: int = 0
    random_baseline: bool = True
    #: search only these layers (None: all); fewer layers make integrated gradients cheaper
    layers: tuple[int, ...] | None = None

    def to_json(self) -> dict:
        out = asdict(self)
        out["layers"] = None if self.layers is None else list(self.layers)
        return out


def _rng(seed: int, fact: ParaphraseFact, purpose: str) -> random.Random:
    return random.Random(f"{seed}:{purpose}:{fact.uuid}")


class UnrelatedFallbackWarning(UserWarning):
    """A fact's unrelated prompts cannot come from another relation (none in the facts): they come from
    another fact of its own relation, or there are none."""


def pick_unrelated(facts: Sequence[ParaphraseFact], fact: ParaphraseFact, seed: int = 0,
                   warn: bool = True) -> ParaphraseFact | None:
    """The fact whose prompts are ``fact``'s unrelated prompts, chosen by ``seed`` and ``fact.uuid``: one of
    another relation (another answer than ``fact``'s where there is one). When ``facts`` hold no other
    relation, another fact of the same relation with another answer, else None; either way (``warn``) an
    :class:`UnrelatedFallbackWarning` of one line names the relation, the fact and its fallback."""
    others = [f for f in facts if f.relation != fact.relation]
    if others:
        pool = [f for f in others if f.answer != fact.answer] or others
        return _rng(seed, fact, "unrelated").choice(pool)
    same = [f for f in facts if f.uuid != fact.uuid and f.answer != fact.answer]
    chosen = _rng(seed, fact, "unrelated").choice(same) if same else None
    if warn:
        head = f"no fact of another relation than {fact.relation!r} in the facts: "
        tail = (f"the unrelated prompts of {fact.uuid} come from {chosen.uuid}, a fact of the same relation "
                f"{fact.relation!r}" if chosen is not None else
                f"{fact.uuid} has no unrelated prompts (no other fact of {fact.relation!r} with another "
                "answer)")
        warnings.warn(head + tail, UnrelatedFallbackWarning, stacklevel=2)
    return chosen


def warn_unrelated_fallbacks(facts: Sequence[ParaphraseFact], seed: int = 0, shown: int = 3) -> str | None:
    """When ``facts`` hold a single relation (so no fact has unrelated prompts of another relation), one
    :class:`UnrelatedFallbackWarning` line naming the relation and the fallbacks of its first ``shown`` facts;
    returns its text, or None when nothing needed saying. The text depends on ``facts`` and ``seed`` only, so
    the shards of a run repeat the same line (shown once by Python's default warning filter)."""
    relations = {f.relation for f in facts}
    if len(relations) != 1:
        return None
    relation = next(iter(relations))
    pairs = []
    for fact in facts[:shown]:
        chosen = pick_unrelated(facts, fact, seed, warn=False)
        pairs.append(f"{fact.uuid} -> {chosen.uuid if chosen is not None else 'none'}")
    more = f", ... ({len(facts) - shown} more)" if len(facts) > shown else ""
    text = (f"no fact of another relation than {relation!r} in the {len(facts)} facts: unrelated prompts "
            f"come from another fact of {relation!r} (fact -> fallback: {', '.join(pairs)}{more}); "
            "fflayers.neurons.facts.load_relations() has facts of several relations")
    warnings.warn(text, UnrelatedFallbackWarning, stacklevel=2)
    return text


def random_neurons(neurons: Iterable[Sequence[int]], d_ff: int, rng: random.Random) -> list[list[int]]:
    """As many random neurons per layer as ``neurons`` has there, none of them in ``neurons``."""
    per_layer: dict[int, set[int]] = {}
    for layer, i in neurons:
        per_layer.setdefault(int(layer), set()).add(int(i))
    out = []
    for layer in sorted(per_layer):
        taken = per_layer[layer]
        pool = [i for i in range(d_ff) if i not in taken]
        if len(pool) < len(taken):
            raise InputError(f"layer {layer} has too few neurons ({d_ff}) for a random set of {len(taken)}")
        out += [[layer, i] for i in sorted(rng.sample(pool, len(taken)))]
    return out


def change_pct(before: float, after: float) -> float:
    """``100 * (after - before) / before`` (NaN when ``before`` is 0)."""
    return 100.0 * (after - before) / before if before > 0 else math.nan


def measure(adapter: LMAdapter, fact: ParaphraseFact, neurons: list[list[int]], prompts: str, kind: str,
            owner: ParaphraseFact, convention: str = "paper") -> list[dict]:
    """Rows of suppress and enhance on every prompt of ``fact`` with ``neurons`` (found for ``owner``), at
    the hook point ``convention`` attributes (see :mod:`fflayers.neurons.modify`)."""
    rows = []
    for name, fn in INTERVENTIONS.items():
        for prompt in fact.prompts:
            try:
                results, _ = fn(adapter, prompt, fact.answer, neurons, convention=convention)
            except FflayersError as err:
                raise InputError(f"fact {fact.uuid}: {err}") from None
            before, after = results["before"]["gt_prob"], results["after"]["gt_prob"]
            rows.append({"uuid": owner.uuid, "relation": owner.relation, "intervention": name,
                         "prompts": prompts, "neurons": kind, "n_neurons": len(neurons), "prompt": prompt,
                         "answer": fact.answer, "before": before, "after": after,
                         "change_pct": change_pct(before, after)})
    return rows


def find_neurons(adapter: LMAdapter, fact: ParaphraseFact, config: SearchConfig) -> list[list[int]]:
    """Refined neurons of a fact over all its prompts."""
    from fflayers.neurons.knowledge_neurons import KnowledgeNeurons

    kn = KnowledgeNeurons(adapter, convention=config.convention)
    cuts = {"threshold": config.coarse_threshold, "adaptive_threshold": config.coarse_adaptive_threshold,
            "percentile": config.coarse_percentile}
    try:
        if config.layers is None:
            return kn.get_refined_neurons(list(fact.prompts), fact.answer, p=config.p,
                                          batch_size=config.batch_size, steps=config.steps, quiet=True,
                                          **{f"coarse_{k}": v for k, v in cuts.items()})
        return _refined_in_layers(adapter, kn, fact, config, cuts)
    except FflayersError as err:
        raise InputError(f"fact {fact.uuid}: {err}") from None


def _refined_in_layers(adapter: LMAdapter, kn, fact: ParaphraseFact, config: SearchConfig,
                       cuts: dict) -> list[list[int]]:
    """Refined neurons with attribution (and the coarse cuts) restricted to ``config.layers``."""
    from fflayers.neurons.attribution import alpha_grid, integrated_gradients
    from fflayers.neurons.selection import coarse_neurons, refine_neurons
    from fflayers.neurons.targets import encode_target

    layers = sorted({adapter.check_layer(x) for x in config.layers})
    if not layers:
        raise InputError("layers is empty; give at least one layer to search, or None for all")
    alphas = alpha_grid(config.steps, config.convention)
    found = []
    for prompt in fact.prompts:
        target = encode_target(adapter, prompt, fact.answer)
        scores = integrated_gradients(adapter, target, kn.point, alphas, batch_size=config.batch_size,
                                      layers=layers, baseline=kn.baseline)
        found.append([[layers[li], i] for li, i in coarse_neurons(scores, **cuts)])
    return refine_neurons(found, config.p)


def evaluate_fact(adapter: LMAdapter, fact: ParaphraseFact, facts: Sequence[ParaphraseFact],
                  config: SearchConfig, neurons: list[list[int]] | None = None, warn: bool = True) -> dict:
    """One fact's record (JSON-ready): its refined neurons (found unless given), the random baseline set, the
    unrelated fact and its relation (:func:`pick_unrelated`), and the measured rows (see
    :data:`ROW_COLUMNS`). ``warn``: warn when the unrelated fact is of the same relation (or missing)."""
    neurons = (find_neurons(adapter, fact, config) if neurons is None
               else [[int(x) for x in n] for n in neurons])
    unrelated = pick_unrelated(facts, fact, config.seed, warn=warn)
    conv = config.convention
    rows = measure(adapter, fact, neurons, "related", "refined", fact, conv)
    if unrelated is not None:
        rows += measure(adapter, unrelated, neurons, "unrelated", "refined", fact, conv)
    baseline = (random_neurons(neurons, adapter.d_ff, _rng(config.seed, fact, "random"))
                if config.random_baseline else [])
    if baseline:
        rows += measure(adapter, fact, baseline, "related", "random", fact, conv)
    return {"uuid": fact.uuid, "relation": fact.relation, "answer": fact.answer, "neurons": neurons,
            "random_neurons": baseline, "unrelated_uuid": None if unrelated is None else unrelated.uuid,
            "unrelated_relation": None if unrelated is None else unrelated.relation, "rows": rows}


def evaluate_facts(adapter: LMAdapter, facts: Sequence[ParaphraseFact], config: SearchConfig | None = None,
                   indices: Iterable[int] | None = None, progress: bool = True,
                   on_record: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Records of ``facts[i]`` for each ``i`` in ``indices`` (default: all); unrelated facts are drawn from
    all of ``facts`` (facts of a single relation: one :func:`warn_unrelated_fallbacks` line, not one a
    fact). ``on_record(i, record)`` is called after each fact (e.g. to save it for ``--resume``)."""
    from tqdm.auto import tqdm

    config = config or SearchConfig()
    indices = list(range(len(facts))) if indices is None else list(indices)
    if indices:
        warn_unrelated_fallbacks(facts, config.seed)
    records = []
    for i in tqdm(indices, desc="facts", unit="fact", disable=not progress):
        record = evaluate_fact(adapter, facts[i], facts, config, warn=False)
        if on_record is not None:
            on_record(i, record)
        records.append(record)
    return records


def results_table(records: Iterable[dict]) -> pd.DataFrame:
    """One row per (fact, intervention, prompt set, neuron set, prompt): see :data:`ROW_COLUMNS`."""
    rows = [row for record in records for row in record["rows"]]
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """Mean % change per relation (and ``all``), intervention, prompt set and neuron set: per-fact means over
    prompts, then the mean over facts with at least one refined neuron (``n_facts``)."""
    cols = ["relation", "intervention", "prompts", "neurons", "change_pct", "n_facts"]
    used = table[table["n_neurons"] > 0]
    if used.empty:
        return pd.DataFrame(columns=cols)
    keys = ["intervention", "prompts", "neurons"]
    per_fact = used.groupby(["relation", "uuid", *keys], sort=False)["change_pct"].mean().reset_index()
    parts = [per_fact, per_fact.assign(relation="all")]
    out = (pd.concat(parts).groupby(["relation", *keys], sort=False)["change_pct"]
           .agg(change_pct="mean", n_facts="count").reset_index())
    return out[cols]


def summarize(records: Sequence[dict]) -> dict:
    """JSON summary per relation (and ``all``): ``{relation: {"suppress": {"related": %, "unrelated": %,
    "random_related": %}, "enhance": {...}, "n_facts": ..., "n_facts_with_neurons": ...,
    "mean_neurons": ...}}``."""
    table = results_table(records)
    summary = summary_table(table)
    out: dict[str, dict] = {}
    by_relation: dict[str, list[dict]] = {}
    for record in records:
        by_relation.setdefault(record["relation"], []).append(record)
    by_relation["all"] = list(records)
    for relation, recs in by_relation.items():
        entry: dict = {name: {} for name in INTERVENTIONS}
        for row in summary[summary["relation"] == relation].itertuples():
            key = row.prompts if row.neurons == "refined" else f"{row.neurons}_{row.prompts}"
            entry[row.intervention][key] = None if math.isnan(row.change_pct) else float(row.change_pct)
        sizes = [len(r["neurons"]) for r in recs]
        entry.update(n_facts=len(recs), n_facts_with_neurons=sum(s > 0 for s in sizes),
                     mean_neurons=sum(sizes) / len(sizes) if sizes else 0.0)
        out[relation] = entry
    return out


register_merge(KIND, merge_piece_states)


class FactsTask(PiecesTask):
    """The facts as the units of a run (:class:`fflayers.runs.UnitTask`): one fact a unit, weighing 1; a
    partial result is a :class:`fflayers.runs.UnitPieces` of records by fact index. ``evaluated`` counts the
    facts this process computed."""

    def __init__(self, adapter: LMAdapter, facts: Sequence[ParaphraseFact], config: SearchConfig) -> None:
        self.adapter, self.facts, self.config = adapter, facts, config
        self.n_units = len(facts)
        self.evaluated = 0

    def unit_weight(self, unit: int) -> int:
        return 1

    def run_units(self, units: range, progress: Callable[[int], object]) -> UnitPieces:
        records = evaluate_facts(self.adapter, self.facts, self.config, indices=units, progress=False,
                                 on_record=lambda _i, _record: progress(1))
        self.evaluated += len(records)
        out = UnitPieces()
        for unit, record in zip(units, records, strict=True):
            out.add(unit, record)
        return out
