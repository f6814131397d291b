"""Thin wrappers over fairseq's command-line tools (``fairseq-preprocess``, ``fairseq-train``,
``fairseq-eval-lm``).

Each wrapper runs the real CLI in a subprocess (the one installed next to the running Python) and raises
:class:`FairseqToolError` with the tail of the tool's output when it fails.

A *model dir* is a folder holding ``model.pt`` and ``dict.txt``: what :func:`train_lm` produces and what
:func:`fflayers.backends.fairseq_loading.load_fairseq_lm` and ``fairseq-eval-lm`` read.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fflayers.core import FAIRSEQ_EXTRA, fairseq_installed

__all__ = [
    "FairseqToolError",
    "cli_path",
    "dict_size",
    "preprocess",
    "train_lm",
    "eval_lm",
    "eval_lm_scores",
    "EvalLMResult",
    "adaptive_cutoffs",
]


class FairseqToolError(ValueError):
    """A fairseq command-line tool failed or got unusable input; one-line message (with the tail of the
    tool's output when it ran)."""


def cli_path(name: str) -> str:
    """Path of a fairseq CLI installed next to the running interpreter (falls back to ``PATH``)."""
    if not fairseq_installed():
        raise FairseqToolError(f"{name} needs fairseq, which is not installed; {FAIRSEQ_EXTRA}")
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FairseqToolError(f"{name} not found next to {sys.executable} nor on PATH; "
                               f"{FAIRSEQ_EXTRA}")
    return found


def _run(name: str, args: Sequence[str], threads: int | None = None) -> str:
    """Run CLI ``name`` with ``args`` (``threads``: torch CPU threads, default from the environment);
    return its combined output or raise a one-line error."""
    cmd = [cli_path(name), *map(str, args)]
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
        tail = " | ".join(lines[-3:]) or "no output"
        if len(tail) > 400:
            tail = "..." + tail[-400:]
        raise FairseqToolError(f"{name} failed (exit {proc.returncode}): {tail}")
    return proc.stdout + proc.stderr


def preprocess(
    train: str | Path,
    valid: str | Path,
    test: str | Path | None,
    dest_dir: str | Path,
    workers: int = 1,
    *,
    threshold: int = 0,
    extra_args: Sequence[str] = (),
) -> Path:
    """Binarise tokenized text files with ``fairseq-preprocess --only-source``; returns ``dest_dir``.

    ``dest_dir`` gets ``dict.txt`` (built from ``train``) and the binary ``train``/``valid``/``test`` splits.
    ``threshold`` > 0 maps words seen fewer than ``threshold`` times in training to ``<unk>``.
    """
    for label, path in (("train", train), ("valid", valid), ("test", test)):
        if path is not None and not Path(path).is_file():
            raise FairseqToolError(
                f"{label} file {path} does not exist; pass an existing tokenized text file")
    args = [
        "--only-source",
        "--trainpref", train,
        "--validpref", valid,
        "--destdir", dest_dir,
        "--workers", workers,
    ]
    if test is not None:
        args += ["--testpref", test]
    if threshold > 0:
        args += ["--thresholdsrc", threshold]
    _run("fairseq-preprocess", [*args, *extra_args])
    return Path(dest_dir)


def dict_size(data_bin: str | Path) -> int:
    """Size of the fairseq dictionary in ``data_bin/dict.txt`` (4 special symbols included)."""
    path = Path(data_bin) / "dict.txt"
    if not path.is_file():
        raise FairseqToolError(f"{path} not found; run preprocess() first")
    with open(path, encoding="utf-8") as f:
        return 4 + sum(1 for line in f if line.strip())


def adaptive_cutoffs(vocab_size: int) -> tuple[int, int]:
    """Two adaptive input/softmax band cutoffs for a vocabulary: WikiText-103's 20k/60k of 268k when large
    enough, otherwise about 1/4 and 1/2 of the vocabulary (both strictly below its size)."""
    if vocab_size >= 100_000:
        return 20_000, 60_000
    if vocab_size < 8:
        raise FairseqToolError(f"vocabulary of {vocab_size} symbols is too small for adaptive input/softmax")
    a = max(4, vocab_size // 4)
    b = max(a + 1, vocab_size // 2)
    return a, b


def train_lm(
    data_bin: str | Path,
    save_dir: str | Path,
    *,
    adaptive: bool,
    layers: int = 2,
    dim: int = 64,
    ffn_dim: int = 256,
    heads: int = 4,
    max_update: int = 50,
    tokens_per_sample: int = 64,
    normalize_before: bool = True,
    final_norm: bool | None = None,
    cutoffs: Sequence[int] | None = None,
    lr: float = 5e-4,
    warmup_updates: int | None = None,
    max_tokens: int = 2048,
    dropout: float = 0.1,
    stop_minutes: float | None = None,
    seed: int = 1,
    cpu: bool = True,
    threads: int | None = 1,
    extra_args: Sequence[str] = (),
) -> Path:
    """Train a transformer LM with ``fairseq-train`` and turn ``save_dir`` into a model dir.

    ``adaptive=True``: ``transformer_lm_wiki103`` with adaptive input + adaptive softmax, tied weights and
    ``adaptive_loss`` (``cutoffs`` default from :func:`adaptive_cutoffs`); ``adaptive=False``: plain
    ``transformer_lm``. ``normalize_before`` picks pre-LN (True) or post-LN (False) blocks; ``final_norm``
    (default: fairseq's, i.e. a final LayerNorm for pre-LN ``transformer_lm``, none for the wiki103 arch)
    controls the LayerNorm after the last block. Training stops after ``max_update`` updates or, when
    given, ``stop_minutes`` of training time, whichever comes first; it validates and saves once, at the
    end (pass ``extra_args=["--save-interval", "1"]`` to save every epoch). Returns ``save_dir`` holding
    ``model.pt`` + ``dict.txt`` (plus fairseq's ``checkpoint_last.pt`` / ``checkpoint_best.pt``).

    ``threads`` sets the CPU threads of the training process (None: from the environment). One thread is
    the default: small models gain little from more, and on a busy machine extra threads spin-wait (measured
    here: 5.9k vs 1.1k tokens/s for a 4-layer, 128-dim model on 2 shared cores).
    """
    data_bin, save_dir = Path(data_bin), Path(save_dir)
    vocab = dict_size(data_bin)
    warmup = warmup_updates if warmup_updates is not None else max(1, min(max_update // 10, 100))
    args: list[str] = [
        str(data_bin),
        "--task", "language_modeling",
        "--save-dir", str(save_dir),
        "--decoder-layers", str(layers),
        "--decoder-embed-dim", str(dim),
        "--decoder-input-dim", str(dim),
        "--decoder-output-dim", str(dim),
        "--decoder-ffn-embed-dim", str(ffn_dim),
        "--decoder-attention-heads", str(heads),
        "--tokens-per-sample", str(tokens_per_sample),
        "--max-tokens", str(max_tokens),
        "--max-update", str(max_update),
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)",
        "--lr", str(lr), "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(warmup),
        "--clip-norm", "0.1",
        "--dropout", str(dropout),
        "--seed", str(seed),
        "--no-epoch-checkpoints",
        "--no-save-optimizer-state",  # a model dir needs the weights, not Adam's moments
        # validate and save once, when training stops (small models train for few updates)
        "--save-interval", "1000000", "--validate-interval", "1000000",
        "--log-format", "simple", "--log-interval", "10",
        "--num-workers", "0",
    ]
    if adaptive:
        a, b = cutoffs if cutoffs is not None else adaptive_cutoffs(vocab)
        if not 0 < a < b < vocab:
            raise FairseqToolError(
                f"adaptive cutoffs {a},{b} must satisfy 0 < A < B < vocabulary size {vocab}")
        args += [
            "--arch", "transformer_lm_wiki103",
            "--adaptive-input", "--adaptive-input-cutoff", f"{a},{b}",
            "--adaptive-softmax-cutoff", f"{a},{b}",
            "--tie-adaptive-weights",
            "--criterion", "adaptive_loss",
            "--ddp-backend", "legacy_ddp",
        ]
    else:
        args += ["--arch", "transformer_lm", "--criterion", "cross_entropy"]
    if normalize_before:
        args.append("--decoder-normalize-before")
    elif adaptive:
        # fairseq's wiki103 architecture always builds pre-LN blocks
        raise FairseqToolError("adaptive=True trains pre-LN blocks only; pass normalize_before=True")
    if final_norm is False:
        args.append("--no-decoder-final-norm")
    elif final_norm is True and adaptive:
        raise FairseqToolError("final_norm=True is not available for the wiki103 arch; leave final_norm=None")
    if stop_minutes is not None:
        args += ["--stop-time-hours", f"{stop_minutes / 60:.6f}"]
    if cpu:
        args.append("--cpu")
    args += list(extra_args)
    save_dir.mkdir(parents=True, exist_ok=True)
    _run("fairseq-train", args, threads=threads)
    last = save_dir / "checkpoint_last.pt"
    if not last.is_file():
        raise FairseqToolError(f"fairseq-train finished without writing {last}; "
                               "check max_update and the data")
    _atomic_copy(last, save_dir / "model.pt")
    _atomic_copy(data_bin / "dict.txt", save_dir / "dict.txt")
    return save_dir


def _atomic_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


_SAMPLE_LINE = re.compile(r"fairseq_cli\.eval_lm(?::| \| )(\d+) (.*\])\s*$")
_LOSS = re.compile(r"Loss \(base 2\): ([0-9.]+)")


@dataclass
class EvalLMResult:
    """What ``fairseq-eval-lm --output-word-probs`` reported.

    ``loss``: its summary loss converted to nats/token (printed with 4 decimals in bits);
    ``samples``: per sample id (with ``--sample-break-mode eos``: the line number in the split), the scored
    tokens and their natural-log probabilities (printed with 6 decimals).
    """

    loss: float
    samples: dict[int, list[tuple[str, float]]] = field(default_factory=dict)

    def mean_loss(self) -> float:
        """Mean negative log-prob per token over the per-token scores (finite ones, as eval-lm does)."""
        scores = [s for toks in self.samples.values() for _, s in toks if math.isfinite(s)]
        return -sum(scores) / len(scores) if scores else self.loss


def _parse_sample(body: str) -> list[tuple[str, float]]:
    out = []
    for item in body.split("\t"):
        item = item.strip()
        if not item:
            continue
        word, _, score = item.rpartition(" [")
        out.append((word, float(score.rstrip("]"))))
    return out


def eval_lm_scores(
    data_bin: str | Path,
    model_dir: str | Path,
    *,
    subset: str = "test",
    checkpoint: str = "model.pt",
    sample_break_mode: str = "eos",
    tokens_per_sample: int = 1024,
    context_window: int = 0,
    max_tokens: int = 4096,
    cpu: bool = True,
    threads: int | None = 1,
    extra_args: Sequence[str] = (),
) -> EvalLMResult:
    """Run ``fairseq-eval-lm --output-word-probs`` on a split and parse its report.

    With ``sample_break_mode="eos"`` (the default here) every line is one sample, scored as
    ``</s> w1 .. wn`` predicting ``w1 .. wn </s>``; fairseq's own default (``none``) cuts the token stream
    into blocks of ``tokens_per_sample`` regardless of sentences. fairseq-eval-lm silently skips samples
    longer than the model's positions.
    """
    model_dir = Path(model_dir)
    path = model_dir / checkpoint
    if not path.is_file():
        raise FairseqToolError(f"checkpoint {path} not found; pass a model dir made by train_lm()")
    args = [
        str(data_bin),
        "--path", str(path),
        "--task", "language_modeling",
        "--gen-subset", subset,
        "--sample-break-mode", sample_break_mode,
        "--tokens-per-sample", str(tokens_per_sample),
        "--context-window", str(context_window),
        "--max-tokens", str(max_tokens),
        "--output-word-probs",
        "--log-format", "simple",
        "--num-workers", "0",
    ]
    if cpu:
        args.append("--cpu")
    out = _run("fairseq-eval-lm", [*args, *extra_args], threads=threads)
    losses = _LOSS.findall(out)
    if not losses:
        raise FairseqToolError("fairseq-eval-lm output has no 'Loss (base 2)' line; check its log")
    result = EvalLMResult(loss=float(losses[-1]) * math.log(2))
    for line in out.splitlines():
        m = _SAMPLE_LINE.search(line)
        if m:
            result.samples[int(m.group(1))] = _parse_sample(m.group(2))
    return result


def eval_lm(data_bin: str | Path, model_dir: str | Path, **kwargs) -> float:
    """Mean loss in nats/token of ``model_dir`` on a split of ``data_bin``, as ``fairseq-eval-lm`` computes
    it.

    Taken from the per-token log-probs fairseq-eval-lm prints (6 decimals), more precise than its 4-decimal
    base-2 summary line; the two are checked against each other. Keyword arguments as in
    :func:`eval_lm_scores`.
    """
    result = eval_lm_scores(data_bin, model_dir, **kwargs)
    mean = result.mean_loss()
    if abs(mean - result.loss) > 1e-3:
        raise FairseqToolError(
            f"fairseq-eval-lm per-token scores give {mean:.5f} nats/token but it reports {result.loss:.5f}; "
            "its output format may have changed"
        )
    return mean
