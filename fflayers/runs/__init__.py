"""Resumable, shardable runs: one mechanism for every long analysis.

A *run* computes one analysis (its ``kind``: ``"trigger_examples"``, ``"ffn_info"``, ...) into one output
path. What identifies it, the *resume key*, is the analysis's config, a dataclass of every option that
changes the result (``dataclasses.asdict`` of it is the key), plus fingerprints of what it reads:
:func:`model_fingerprint` of the model, :func:`data_digest` of the token ids, :func:`file_digest` of input
files (their content, never their path).

The work is a *plan* (:mod:`fflayers.runs.plan`): a list of *units* fixed by the data alone (batches of
sentences, blocks of facts, layers), each with a weight (its sentences, facts, ...), grouped into
contiguous *shards*, at least four per worker. Every number of processes computes the same units, so a
sharded run does the same floating-point work as one process, and the parts are combined with the task's
associative merge (:mod:`fflayers.runs.accumulators` describes the state protocol such parts follow).

With a run folder (``OUTPUT.ckpt``, for ``--resume`` or ``--shard``) the plan is stored in
``manifest.json`` (:class:`Manifest`: format ``fflayers-run/1``, kind, resume key, plan, a status per shard)
and each finished shard's state in ``shard-NNNNN.pt`` (:mod:`fflayers.runs.shards`), written atomically and
hashed. A rerun skips the finished shards, whatever killed the earlier one and however many workers it has
now; a shard whose file is unusable is computed again, with a warning. A folder of another analysis, of an
older format or of another resume key is refused in one line (:class:`~fflayers.core.RunStateError`, naming
each option that differs and both values).

Workers (:class:`Workers`) are torchrun ranks times job-array jobs (``--shard I/N``); worker ``w`` takes the
contiguous share ``w`` of the shards. :func:`run_units` merges a job's shards on its rank 0; a job of an
array writes a partial ``OUTPUT.shard-I-of-N.pt`` (:mod:`fflayers.runs.partials`), and
:func:`merge_partials` merges the partials of all jobs with the merge registered for their kind
(:func:`register_merge`, which also takes the writer of the run's output, :func:`merged_writer`).
"""

from fflayers.runs.accumulators import (
    Accumulator,
    PiecesTask,
    UnitPieces,
    from_state,
    merge_all,
    merge_parts,
    merge_piece_states,
)
from fflayers.runs.engine import RecomputeWarning, RunResult, UnitTask, Workers, resume_key, run_units
from fflayers.runs.fingerprints import config_dict, config_hash, data_digest, file_digest, model_fingerprint
from fflayers.runs.manifest import FORMAT, MANIFEST, Manifest, config_differences
from fflayers.runs.partials import (
    PARTIAL_FORMAT,
    MergedPartials,
    find_partials,
    merge_function,
    merge_partials,
    merged_writer,
    partial_header,
    partial_path,
    read_partial,
    register_merge,
    write_partial,
)
from fflayers.runs.plan import SHARD_WEIGHT, SHARDS_PER_WORKER, choose_n_shards, group_units, make_plan
from fflayers.runs.shards import ShardFileError, load_shard, save_shard, shard_file, shard_file_intact

__all__ = [
    "FORMAT", "MANIFEST", "PARTIAL_FORMAT", "SHARDS_PER_WORKER", "SHARD_WEIGHT", "Accumulator", "Manifest",
    "MergedPartials", "PiecesTask", "RecomputeWarning", "RunResult", "ShardFileError", "UnitTask", "Workers",
    "choose_n_shards", "config_dict", "config_differences", "config_hash", "data_digest", "file_digest",
    "find_partials", "from_state", "group_units", "load_shard", "make_plan", "merge_all", "merge_function",
    "merge_parts", "merge_partials", "merged_writer", "model_fingerprint", "partial_header", "partial_path",
    "read_partial", "register_merge", "resume_key", "run_units", "save_shard", "shard_file",
    "shard_file_intact", "UnitPieces", "merge_piece_states", "write_partial",
]
