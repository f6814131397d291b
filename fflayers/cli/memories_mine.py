"""Trigger examples of FFN keys (``--get_trigger_examples``) or layer / value predictions
(``--extract_ffn_info``) over a corpus; the flags of the original ``analysis/generate_outputs.py``.

    fflayers memories mine --data_file wiki.train.tokens --model_dir checkpoints/adaptive_lm_wiki103.v2 \
        --get_trigger_examples --max_sentences 1000000 --top_k_trigger_examples 50 --extract_mode layer-raw \
        --output_file top50_train_1000000sents.jsonl

(``python analysis/generate_outputs.py ...`` is the same.)

Pipeline: read the corpus (WikiText token lines for ``*.tokens``, else plain text / JSON lines), shuffle lines
with ``--seed`` (default 0xdead = 57005, the original's), split them into sentences, keep the first
``--max_sentences``, tokenize with the model, then mine (:func:`fflayers.memories.trigger_examples`) or
extract (:func:`fflayers.memories.ffn_info.extract_ffn_info`).

Outputs: trigger examples as the original JSONL (``.jsonl``: one line per dim) or, for the other table
suffixes (``.parquet``/``.pkl``/``.pickle``/``.tsv``/``.csv``), a long table (layer, dim, rank, sentence_id,
position, value, text); FFN info as a pickled DataFrame (``.pkl``, the original) or by extension
(:data:`fflayers.io.TABLE_FORMATS`). Any other suffix is refused before the run. The run's config and metadata
go to ``OUTPUT_FILE.meta.json``. Bad input: one line on stderr, exit code 2, no output file.

New flags: ``--hf_model`` (a HuggingFace id or folder, instead of ``--model_dir``), ``--gguf_file``,
``--device``, ``--batch_tokens``, ``--layers``, ``--seed``, ``--resume`` (checkpoint in
``OUTPUT_FILE.ckpt``, removed after a successful run), ``--raw_wikitext`` (a subword model reads a ``.tokens``
corpus as it is; by default it reads it detokenized, as ordinary text), ``--trust-checkpoint`` (full
unpickling of old fairseq checkpoints you trust), ``--quiet`` (no progress bars), ``--dtype bf16|fp16``
(autocast the forward pass), ``--shard I/N`` (job I of a job array; ``fflayers merge`` / ``merge_shards.py``
merges the partials). Runs under ``torchrun`` as they are (README "Large runs"): each rank scans its shards,
rank 0 writes the output. ``--multiprocess`` is accepted and ignored. ``--model_dir`` has no default
(the original's was ``checkpoints/adaptive_lm_wiki103.v2``): give it or ``--hf_model``.
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from fflayers.memories.scan import ScanConfig

__all__ = ["PROG", "build_parser", "check_args", "run", "main", "command"]

PROG = "generate_outputs.py"
DEFAULT_SEED = 0xDEAD
UNK_LIMIT = 0.5


def build_parser(prog: str = PROG, epilog: str | None = None) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=epilog)
    p.add_argument("--data_file", type=str, help="corpus: WikiText-format .tokens, plain text or .jsonl")
    add_model_args(p)
    p.add_argument("--output_file", type=str, default="",
                   help=".jsonl for trigger examples, .pkl for ffn info (.parquet/.tsv/.csv: tables)")
    p.add_argument("--max_sentences", type=int, default=-1, help="number of sentences to use, -1 for all")
    p.add_argument("--multiprocess", type=int, default=20, help="ignored (kept for compatibility)")
    p.add_argument("--get_trigger_examples", action="store_true",
                   help="get trigger examples for keys in the network")
    p.add_argument("--top_k_trigger_examples", type=int, default=50, help="trigger examples per key")
    p.add_argument("--dims_for_analysis", nargs="*", type=int, default=None,
                   help="FFN dims to analyse (default: all)")
    p.add_argument("--extract_ffn_info", action="store_true", help="extract layer / value predictions")
    p.add_argument("--extract_mode", choices=["dim", "layer", "layer-raw"], default="layer-raw")
    p.add_argument("--layers", nargs="*", type=int, default=None, help="layers to analyse (default: all)")
    p.add_argument("--batch_tokens", type=int, default=None,
                   help="padded tokens per batch (default: from free GPU memory on CUDA, 4096 on CPU)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast the forward pass to bf16 / fp16 (faster on GPUs; see README 'Large runs')")
    p.add_argument("--shard", type=str, default=None, metavar="I/N",
                   help="job I of N of a job array: write OUTPUT_FILE.shard-I-of-N.pt (merge with "
                        "merge_shards.py); finished shards in OUTPUT_FILE.ckpt are reused")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help="line shuffling seed (default 0xdead, the original's)")
    p.add_argument("--resume", action="store_true",
                   help="checkpoint finished shards to OUTPUT_FILE.ckpt and continue from them (all modes)")
    p.add_argument("--raw_wikitext", action="store_true",
                   help="feed a .tokens corpus to a subword (HF) model as it is (default: detokenized to "
                        "ordinary text: '@-@' -> '-', no space before punctuation, "
                        "\"John 's\" -> \"John's\")")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Reject flag combinations before anything is loaded."""
    if args.get_trigger_examples == args.extract_ffn_info:
        raise CLIError("pass exactly one of --get_trigger_examples and --extract_ffn_info")
    if args.get_trigger_examples and args.extract_mode != "layer-raw":
        raise CLIError("--get_trigger_examples needs --extract_mode layer-raw")
    if args.extract_ffn_info and args.extract_mode == "layer-raw":
        raise CLIError("--extract_ffn_info needs --extract_mode layer or dim")
    check_model_args(args)
    if not args.data_file:
        raise CLIError("--data_file is required")
    if not args.output_file:
        raise CLIError("--output_file is required")
    from fflayers.io import table_suffix

    table_suffix(args.output_file, "--output_file")  # .jsonl: the original JSONL for trigger examples
    if args.top_k_trigger_examples < 1:
        raise CLIError(f"--top_k_trigger_examples {args.top_k_trigger_examples} must be >= 1")
    if args.max_sentences == 0 or args.max_sentences < -1:
        raise CLIError(f"--max_sentences {args.max_sentences} must be positive, or -1 for all")
    if args.batch_tokens is not None and args.batch_tokens < 1:
        raise CLIError(f"--batch_tokens {args.batch_tokens} must be >= 1")
    if args.dims_for_analysis is not None and any(d < 0 for d in args.dims_for_analysis):
        raise CLIError(f"--dims_for_analysis {min(args.dims_for_analysis)} is negative; dims count from 0")
    if not Path(args.data_file).is_file():
        raise CLIError(f"--data_file {args.data_file} does not exist; pass a corpus file")
    if args.shard is not None:
        from fflayers.distributed import parse_shard_spec

        parse_shard_spec(args.shard)
    if args.dtype == "fp16" and args.device == "cpu":
        raise CLIError("--dtype fp16 needs a GPU; use --dtype bf16 on the CPU")


def check_parquet() -> None:
    """Fail before the run, not after it, when parquet cannot be written."""
    try:
        import pyarrow  # noqa: F401
    except ImportError as err:
        raise CLIError(f"parquet output needs a working pyarrow ({str(err).splitlines()[0]}); "
                       "install one that matches numpy, or write .pkl / .jsonl") from None


def check_vocabulary(adapter, ids: list[list[int]]) -> None:
    """Fail when most corpus tokens are unknown to the model (corpus and dictionary do not match)."""
    unk = adapter.vocab.unk_id
    if unk is None:
        return
    bos = adapter.vocab.bos_id
    n_unk = n_all = 0
    for seq in ids:
        body = seq[1:] if seq and bos is not None and seq[0] == bos else seq
        n_all += len(body)
        n_unk += sum(1 for t in body if t == unk)
    if n_all and n_unk / n_all > UNK_LIMIT:
        raise CLIError(
            f"{100 * n_unk / n_all:.0f}% of the corpus tokens are unknown (<unk>) to the model's dictionary; "
            "the corpus does not match the model: use text tokenized like its training data"
        )


def read_sentences(args: argparse.Namespace, pretokenized: bool) -> list[str]:
    """Shuffled sentences of the corpus (first ``--max_sentences``)."""
    from fflayers.data import read_corpus, read_wikitext_lines, shuffled_sentences

    path = args.data_file
    lines = read_wikitext_lines(path) if pretokenized else read_corpus(path)
    return shuffled_sentences(lines, seed=args.seed, max_sentences=args.max_sentences,
                              pretokenized=pretokenized)


def tokenize(adapter, sentences: list[str]) -> tuple[list[str], list[list[int]]]:
    """Texts for the output (word-level models: the space-joined words) and token ids of each sentence."""
    words = getattr(adapter.vocab, "words", None)
    texts: list[str] = []
    ids: list[list[int]] = []
    for sent in sentences:
        seq = adapter.vocab.tokenize(sent)
        if not seq:
            continue
        texts.append(" ".join(words(sent)) if callable(words) else sent)
        ids.append(seq)
    if not ids:
        raise CLIError("the corpus yields no tokens; pass a non-empty corpus")
    check_vocabulary(adapter, ids)
    return texts, ids


DTYPES = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


def scan_config(args: argparse.Namespace, n_sentences: int, layers: list[int], dims: list[int]) -> ScanConfig:
    """The :class:`~fflayers.memories.scan.ScanConfig` of this command's run (with the model and data
    fingerprints: its resume key and the header of its partials)."""
    from fflayers.memories.scan import ScanConfig

    trig = args.get_trigger_examples
    return ScanConfig("trigger_examples" if trig else "ffn_info", layers, dims, n_sentences,
                      k=args.top_k_trigger_examples if trig else None, batch_tokens=args.batch_tokens,
                      mode=args.extract_mode, seed=args.seed, dtype=args.dtype)


def make_task(args: argparse.Namespace, adapter, ids, layers, dims):
    """``batch_tokens -> task``, built once per value (building an FFN-info task checks the model's head)."""
    import functools

    import torch

    dtype = getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None
    if args.get_trigger_examples:
        from fflayers.memories.trigger_examples import TriggerScan

        return functools.cache(
            lambda bt: TriggerScan(adapter, ids, args.top_k_trigger_examples, layers, dims, bt, dtype))
    from fflayers.memories.ffn_info import FfnInfoScan

    sel = dims if args.extract_mode == "dim" and args.dims_for_analysis else None
    return functools.cache(
        lambda bt: FfnInfoScan(adapter, ids, args.extract_mode, layers, sel, args.seed, bt, dtype=dtype))


def run(args: argparse.Namespace) -> None:
    from fflayers.distributed import dist_info, finish, join_ranks, parse_shard_spec

    check_args(args)
    info = dist_info()
    if info.enabled:
        args.device = str(join_ranks(info, args.device, timeout_s=7 * 24 * 3600))
    try:
        scan(args, info, parse_shard_spec(args.shard) if args.shard else (0, 1))
    finally:
        finish()


def scan(args: argparse.Namespace, info, job: tuple[int, int]) -> None:
    from fflayers.data import text_for_model
    from fflayers.io import check_writable, run_metadata, write_json
    from fflayers.memories.partials import (
        MODULE,
        partial_path,
        referenced_texts,
        write_partial,
        write_scan_output,
    )
    from fflayers.memories.scan import auto_batch_tokens, run_scan
    from fflayers.runs import Manifest, Workers, data_digest, model_fingerprint

    output = check_writable(args.output_file)
    if output.suffix.lower() == ".parquet":
        check_parquet()
    pretokenized = Path(args.data_file).suffix.lower() == ".tokens"
    start = time.time()
    sentences = read_sentences(args, pretokenized)
    adapter = load_adapter(args, raw_text=not pretokenized)
    if args.dims_for_analysis:
        bad = [d for d in args.dims_for_analysis if d >= adapter.d_ff]
        if bad:
            raise CLIError(f"--dims_for_analysis {bad[0]} is out of range: the model has {adapter.d_ff} "
                           f"FFN dims (0..{adapter.d_ff - 1})")
    if args.dtype == "fp16" and adapter.device.type != "cuda":
        raise CLIError("--dtype fp16 needs a GPU; use --dtype bf16 on the CPU")
    dims = (list(dict.fromkeys(args.dims_for_analysis)) if args.dims_for_analysis
            else list(range(adapter.d_ff)))
    if args.extract_ffn_info and args.dims_for_analysis:
        dims = sorted(set(dims))
    layers = (list(range(adapter.n_layers)) if not args.layers
              else list(dict.fromkeys(adapter.check_layer(x) for x in args.layers)))
    texts, ids = tokenize(adapter, text_for_model(adapter, sentences, pretokenized, args.raw_wikitext))
    if info.is_main:
        print(f"{prog_name()}: {len(ids)} sentences, {sum(map(len, ids))} tokens, model {adapter}"
              + (f", {info.world_size} ranks" if info.enabled else "")
              + (f", job {job[0]} of {job[1]}" if job[1] > 1 else ""))

    config = scan_config(args, len(ids), layers, dims)
    fingerprints = {"model": model_fingerprint(adapter), "data": data_digest(ids)}
    run_dir = Path(str(output) + ".ckpt") if (args.resume or args.shard) else None
    batch_tokens = args.batch_tokens or auto_batch_tokens(adapter)
    workers = Workers(job[0], job[1], info.rank, info.world_size)
    task_for = make_task(args, adapter, ids, layers, dims)
    done = run_scan(task_for, batch_tokens, config, fingerprints, run_dir, workers,
                    progress=not args.quiet, desc="trigger examples" if args.get_trigger_examples
                    else f"ffn info ({args.extract_mode})")
    if not info.is_main:
        return
    plan = done.plan
    print(f"{prog_name()}: {plan['n_shards']} shards of {plan['n_units']} units, "
          f"batch_tokens {plan['batch_tokens']}; "
          f"computed {done.computed_all}, reused {done.reused} finished shard(s)")
    state = done.result
    if state is not None and args.extract_ffn_info:
        state = task_for(int(plan["batch_tokens"])).result(state)
    elif state is not None:
        state = state.state_dict()
    meta = dict(vars(args))
    meta.update(n_sentences=len(ids), n_tokens=sum(map(len, ids)), device=str(adapter.device),
                model=repr(adapter),
                ranks=info.world_size, shards=plan["n_shards"], batch_tokens_used=plan["batch_tokens"],
                seconds=round(time.time() - start, 3))
    if job[1] > 1:
        path = partial_path(output, *job)
        header = {"kind": done.kind, "config": done.config, "config_hash": done.config_hash, "job": job[0],
                  "jobs": job[1], "n_shards": plan["n_shards"], "shards": done.job_shards,
                  "output": str(output), "meta": meta, "data_file": args.data_file, "module": MODULE}
        texts_needed = referenced_texts(state, texts) if args.get_trigger_examples else {}
        write_partial(path, header, state, texts_needed)
        print(f"{prog_name()}: wrote partial {path} (shards {done.job_shards[:1]}..{done.job_shards[-1:]} of "
              f"{plan['n_shards']}); when all {job[1]} jobs are done: "
              f"{merge_command()} --output_file {output}")
        return
    write_scan_output(output, done.kind, state, done.config, texts)
    meta["manifest"] = None if run_dir is None else Manifest(run_dir).read()
    write_json(str(output) + ".meta.json", run_metadata(meta, inputs={"data_file": args.data_file}))
    if run_dir is not None:
        shutil.rmtree(run_dir, ignore_errors=True)
    print(f"{prog_name()}: wrote {output} in {time.time() - start:.1f} s")


def merge_command() -> str:
    """How to merge the partials, in the words of the running command."""
    return "fflayers merge" if prog_name().startswith("fflayers ") else "python analysis/merge_shards.py"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``generate_outputs.py``; returns the exit code (2 for bad input, one line on stderr)."""
    return run_main(PROG, build_parser, run, argv)


def command(argv: Sequence[str] | None, prog: str, epilog: str | None = None) -> int:
    """``fflayers memories mine``: the same, named ``prog``."""
    return run_command(prog, build_parser, run, argv, epilog)
