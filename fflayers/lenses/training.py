"""Training a tuned (or hybrid) lens on KL(final || lens) over corpus tokens.

The tuned-lens paper's defaults: SGD with Nesterov momentum 0.9, learning rate 1.0 decaying linearly to 0,
weight decay 1e-3, 2^18 tokens a step, 250 steps (Adam as an option). A step takes the next sequences of the
corpus, in order and cycling, until it holds ``tokens_per_step`` tokens; its loss is the sum over layers of
the mean KL over its tokens, each layer backpropagated on its own (one layer's V-wide logits alive at a
time). Under torchrun each rank takes every ``world``-th micro-batch of a step and the gradients are summed
over ranks (each micro-batch's loss is already weighted by its share of the step's tokens).

``checkpoint`` (a file) makes the run resumable: the translators, optimizer and schedule are saved there
every ``save_every`` steps (atomically), with the config and fingerprints; a rerun continues from the last
saved step and gives the same lens as an uninterrupted run; a rerun with another config is refused, naming
what differs.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fflayers.backends.base import LMAdapter
from fflayers.core import FflayersError, InputError, RunStateError
from fflayers.data.batching import pad_right, plan_batches
from fflayers.lenses.lens import sequence_states
from fflayers.lenses.tuned import TunedLens

__all__ = ["LensTrainConfig", "LensTrainingError", "StepStates", "kl_loss", "step_batches", "train_lens",
           "train_lens_on_states"]

OPTIMIZERS = ("sgd", "adam")


class LensTrainingError(FflayersError):
    """Training produced a non-finite loss (the lens is not saved)."""


@dataclass(frozen=True)
class LensTrainConfig:
    """Everything that changes a trained lens (``asdict`` is its resume key)."""

    kind: str = "tuned"  # "tuned" (zero start) or "hybrid" (starts at the shortcut maps)
    steps: int = 250
    tokens_per_step: int = 2**18
    lr: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 1e-3
    optimizer: str = "sgd"
    batch_tokens: int = 4096  # tokens of a micro-batch (memory only: a step's gradient is their sum)
    bias: bool = True
    clip_grad_norm: float | None = 1.0  # clip the gradient norm of each step (None: no clipping)
    layers: tuple[int, ...] | None = None  # the translators trained (None: every layer 0..L-1)
    dtype: str = "fp32"  # autocast of the model's forward that gives the states (the lens stays float32)

    def __post_init__(self) -> None:
        if self.kind not in ("tuned", "hybrid"):
            raise InputError(f"lens kind {self.kind!r} cannot be trained; use tuned or hybrid")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"optimizer {self.optimizer!r} unknown; use one of {', '.join(OPTIMIZERS)}")
        for name in ("steps", "tokens_per_step", "batch_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name}={value!r} must be a positive integer")
        if not self.lr > 0:
            raise InputError(f"lr={self.lr!r} must be positive")


def kl_loss(final_log_probs: torch.Tensor, lens_log_probs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(final || lens) in nats."""
    p = final_log_probs.exp()
    return (p * (final_log_probs - lens_log_probs)).sum(-1).mean()


def step_batches(lengths: Sequence[int], steps: int, tokens_per_step: int) -> list[list[int]]:
    """The sequence indices of each step: in corpus order, cycling, until a step holds ``tokens_per_step``
    tokens. :class:`~fflayers.core.InputError` if the corpus holds fewer tokens than one step."""
    total = sum(lengths)
    if total < tokens_per_step:
        raise InputError(f"the training corpus has {total} tokens, fewer than one step of {tokens_per_step}; "
                         "give more text or lower --tokens_per_step")
    out, i, n = [], 0, len(lengths)
    for _ in range(steps):
        batch, tokens = [], 0
        while tokens < tokens_per_step:
            batch.append(i % n)
            tokens += lengths[i % n]
            i += 1
        out.append(batch)
    return out


def _micro_batches(indices: list[int], lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Consecutive groups of a step's sequences with at most ``batch_tokens`` padded tokens (one at least)."""
    groups = plan_batches([lengths[i] for i in indices], batch_tokens, sort_by_length=False)
    return [[indices[j] for j in group] for group in groups]


def _optimizer(lens: TunedLens, cfg: LensTrainConfig):
    params = list(lens.parameters())
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                              weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1.0 - t / cfg.steps))
    return opt, schedule


def _resume_state(checkpoint: Path, key: dict) -> dict | None:
    from fflayers.runs import config_differences

    if not checkpoint.is_file():
        return None
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        reason = str(e).splitlines()[0][:100]
        raise RunStateError(f"{checkpoint} is not a lens training checkpoint ({reason}); "
                            "delete it to start over") from None
    if not isinstance(state, dict) or state.get("format") != "fflayers-lens-train/1":
        raise RunStateError(f"{checkpoint} is not a lens training checkpoint; delete it to start over")
    diffs = config_differences(key, state["key"])
    if diffs:
        named = "; ".join(f"{k}: {a} here, {b} in the checkpoint" for k, a, b in diffs)
        raise RunStateError(f"{checkpoint} belongs to another training run ({named}); use another output "
                            "or delete the checkpoint")
    return state


#: a step's micro-batches: ``step -> [(states [n, L+1, d], weight)]`` (weight: the batch's share of the step)
StepStates = Callable[[int], Iterator[tuple[torch.Tensor, float]]]


def train_lens(
    adapter: LMAdapter,
    sequences: Sequence[Sequence[int]],
    config: LensTrainConfig = LensTrainConfig(),
    lens: TunedLens | None = None,
    checkpoint: str | os.PathLike | None = None,
    save_every: int = 10,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[TunedLens, list[float]]:
    """Train ``lens`` (default: a zero-started tuned lens) on ``sequences`` (token ids, each at most the
    model's length); returns the lens and the loss of every step (sum over layers of the mean KL, nats).
    ``on_step(step, loss)`` is called after each step (its checkpoint, if due, already written)."""
    from fflayers.distributed import dist_info
    from fflayers.runs import data_digest

    sequences = [list(s) for s in sequences if len(s) > 0]
    if not sequences:
        raise InputError("no training text: the corpus gave no token sequences")
    for s in sequences:
        adapter.check_length(len(s))
    lengths = [len(s) for s in sequences]
    plan = step_batches(lengths, config.steps, config.tokens_per_step)
    info = dist_info()
    pad = adapter.vocab.pad_id if adapter.vocab.pad_id is not None else 0

    def step_states(step: int) -> Iterator[tuple[torch.Tensor, float]]:
        step_tokens = sum(lengths[i] for i in plan[step])
        for m, group in enumerate(_micro_batches(plan[step], lengths, config.batch_tokens)):
            if info.enabled and m % info.world_size != info.rank:
                continue
            states = sequence_states(adapter, *pad_right([sequences[i] for i in group], pad), config.dtype)
            yield states, states.shape[0] / step_tokens

    return train_lens_on_states(adapter, step_states, config, lens, checkpoint, save_every, progress,
                                on_step, data=data_digest(sequences))


def train_lens_on_states(
    adapter: LMAdapter,
    step_states: StepStates,
    config: LensTrainConfig = LensTrainConfig(),
    lens: TunedLens | None = None,
    checkpoint: str | os.PathLike | None = None,
    save_every: int = 10,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    data: str = "",
) -> tuple[TunedLens, list[float]]:
    """:func:`train_lens` on states given by ``step_states`` (``data``: a digest of what they come from, for
    the resume key); the final distribution of each state row is the model's head on its state L."""
    from fflayers.distributed import dist_info
    from fflayers.runs import model_fingerprint

    if config.kind == "hybrid" and lens is None:
        raise InputError("the hybrid lens starts at the shortcut maps: pass TunedLens.from_shortcuts(...)")
    L = adapter.n_layers
    if config.layers is not None:
        bad = [x for x in config.layers if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < L]
        if bad:
            raise InputError(f"lens layers {bad} out of range: translators are 0..{L - 1}")
    lens = lens if lens is not None else TunedLens(adapter, bias=config.bias)
    key = {**dataclasses.asdict(config), "model": model_fingerprint(adapter), "data": data}
    opt, schedule = _optimizer(lens, config)
    losses: list[float] = []
    start = 0
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and (state := _resume_state(path, key)) is not None:
        lens.translators.load_state_dict(state["translators"])
        opt.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        losses, start = [float(x) for x in state["losses"]], int(state["step"])
    info = dist_info()
    layers = list(range(L)) if config.layers is None else list(config.layers)
    params = list(lens.parameters())
    for p in params:  # a rank without a micro-batch in a step still sums zeros
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    frozen = [p for p in adapter.model.parameters() if p.requires_grad]
    for p in frozen:  # gradients for the translators only
        p.requires_grad_(False)
    bar = tqdm(total=config.steps, initial=start, desc="lens", unit="step", disable=not progress)
    try:
        for step in range(start, config.steps):
            opt.zero_grad(set_to_none=False)
            loss_sum = torch.zeros((), dtype=torch.float64)
            for states, weight in step_states(step):
                with torch.no_grad():
                    final = adapter.project(states[:, L]).float()
                for layer in layers:
                    loss = kl_loss(final, lens.log_probs(states[:, layer], layer)) * weight
                    loss.backward()
                    loss_sum += float(loss.detach())
            if info.enabled:
                import torch.distributed as dist

                for p in params:
                    dist.all_reduce(p.grad)
                dist.all_reduce(loss_sum)
            value = float(loss_sum)
            if not math.isfinite(value):
                last = f"{losses[-1]:.4f} at step {len(losses) - 1}" if losses else "none"
                raise LensTrainingError(f"lens training diverged at step {step}: loss {value} (last finite "
                                        f"loss {last}); lower --lr; nothing saved")
            if config.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm)
            opt.step()
            schedule.step()
            losses.append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            done = step + 1
            if path is not None and info.is_main and (done % save_every == 0 or done == config.steps):
                _save_state(path, key, lens, opt, schedule, losses, done)
            if on_step is not None:
                on_step(done, value)
    finally:
        bar.close()
        for p in frozen:
            p.requires_grad_(True)
    lens.meta = {"train": dataclasses.asdict(config), "losses": losses}
    return lens, losses


def _save_state(path: Path, key: dict, lens: TunedLens, opt, schedule, losses: list[float],
                step: int) -> None:
    from fflayers.io import atomic_write

    state = {"format": "fflayers-lens-train/1", "key": key, "step": step, "losses": losses,
             "translators": lens.translators.state_dict(), "optimizer": opt.state_dict(),
             "schedule": schedule.state_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb", encoding=None) as f:
        torch.save(state, f)
