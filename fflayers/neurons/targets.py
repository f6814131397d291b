"""The input a knowledge-neuron query runs on: a prompt, its ground truth, and where the model predicts it.

Causal LMs: the ground truth follows the prompt (joined by one space by default) and is teacher-forced: the
model reads the prompt and every target token but the last, and target token ``i`` is predicted at the
position just before it. Masked LMs (BERT): the prompt holds the mask token where the ground truth goes; a
single mask is widened to one mask per wordpiece, and piece ``i`` is predicted at mask ``i``.

Prompts and ground truths are text, or lists of token ids for models without a tokenizer (then nothing is
joined: the prompt ids are used as given, BOS included if wanted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError

TextOrIds = str | Sequence[int]


@dataclass
class TargetInput:
    """Token ids ``[1, T]`` on the adapter's device, the positions whose outputs predict the target tokens,
    and those target tokens (same length as ``positions``)."""

    ids: torch.Tensor
    positions: list[int]
    target_ids: list[int]

    @property
    def n_targets(self) -> int:
        return len(self.target_ids)


def _is_text(x: object) -> bool:
    return isinstance(x, str)


def _check_ids(adapter: LMAdapter, ids: Sequence[int], what: str) -> list[int]:
    try:
        out = [int(i) for i in ids]
    except (TypeError, ValueError):
        raise InputError(f"{what} must be text or a list of token ids, got {ids!r}") from None
    bad = [i for i in out if not 0 <= i < adapter.vocab_size]
    if bad:
        raise InputError(f"{what} has token ids {bad} outside the vocabulary (0..{adapter.vocab_size - 1})")
    return out


def _squash(text: str) -> str:
    return "".join(text.split())


def check_spelling(adapter: LMAdapter, ground_truth: str, ids: Sequence[int]) -> None:
    """Raise :class:`~fflayers.core.InputError` unless ``ids`` spell ``ground_truth`` back (whitespace
    ignored; case ignored only where the tokenizer lowercases): an unknown word must never become a silent
    ``[UNK]``."""
    if not ids:
        raise InputError(f"ground truth {ground_truth!r} has no tokens; give a non-empty answer")
    back = adapter.vocab.detokenize(list(ids))
    want, got = _squash(ground_truth), _squash(back)
    if got == want or (got == want.lower() and got != want and got.islower()):
        return
    raise InputError(
        f"the tokenizer cannot represent ground truth {ground_truth!r}: it becomes {back!r} "
        f"(tokens {adapter.vocab.id_to_token(list(ids))}); "
        "use an answer the model's vocabulary spells as given"
    )


def _causal(adapter: LMAdapter, prompt: TextOrIds, ground_truth: TextOrIds,
            sep: str) -> tuple[list[int], list[int]]:
    if _is_text(prompt) != _is_text(ground_truth):
        raise InputError("give prompt and ground truth both as text or both as token ids")
    if not _is_text(prompt):
        return _check_ids(adapter, prompt, "prompt"), _check_ids(adapter, ground_truth, "ground truth")
    if not ground_truth.strip():
        raise InputError("ground truth is empty; give the answer that should follow the prompt")
    head = prompt.rstrip()
    prompt_ids = adapter.vocab.tokenize(head)
    full = adapter.vocab.tokenize(head + sep + ground_truth.strip())
    if full[: len(prompt_ids)] != prompt_ids:
        raise InputError(
            f"the prompt {head!r} is tokenized differently once the ground truth {ground_truth!r} follows "
            "it; end the prompt at a word boundary"
        )
    target = full[len(prompt_ids):]
    check_spelling(adapter, ground_truth, target)
    return prompt_ids, target


def _masked(adapter: LMAdapter, prompt: TextOrIds, ground_truth: TextOrIds, mask_id: int | None):
    mask_text = adapter.vocab.mask_token
    mask_id = adapter.vocab.mask_id if mask_id is None else int(mask_id)
    if _is_text(ground_truth):
        target = adapter.vocab.tokenize(ground_truth.strip(), add_bos=False)
        check_spelling(adapter, ground_truth, target)
    else:
        target = _check_ids(adapter, ground_truth, "ground truth")
    n = len(target)
    if _is_text(prompt):
        found = prompt.count(mask_text)
        if found == 1 and n > 1:
            prompt = prompt.replace(mask_text, " ".join([mask_text] * n))
            found = n
        ids = adapter.vocab.tokenize(prompt)
    else:
        if mask_id is None:
            raise InputError("this masked LM has no tokenizer to name its mask token; pass mask_id=")
        ids = _check_ids(adapter, prompt, "prompt")
        found = ids.count(mask_id)
        if found == 1 and n > 1:
            at = ids.index(mask_id)
            ids = ids[:at] + [mask_id] * n + ids[at + 1 :]
            found = n
    if found == 0:
        raise InputError(f"prompt {prompt!r} has no {mask_text}; put {mask_text} where the ground truth goes")
    if found != n:
        raise InputError(
            f"prompt has {found} {mask_text} tokens but ground truth {ground_truth!r} has {n} wordpiece(s); "
            f"use one {mask_text} (widened automatically) or exactly one per wordpiece"
        )
    positions = [i for i, t in enumerate(ids) if t == mask_id]
    if len(positions) != n:
        raise InputError(f"{mask_text} did not tokenize to the mask token id {mask_id}; "
                         f"write it exactly as {mask_text!r}")
    return ids, positions, target


def encode_target(
    adapter: LMAdapter, prompt: TextOrIds, ground_truth: TextOrIds, mask_id: int | None = None, sep: str = " "
) -> TargetInput:
    """Build the :class:`TargetInput` of a prompt and its ground truth (see the module docstring).

    Causal text: the model reads ``prompt.rstrip() + sep + ground_truth.strip()`` (``sep=""`` glues them).
    ``mask_id``: the mask token of a masked LM given token ids without a tokenizer.

    :class:`~fflayers.core.InputError` for a ground truth the tokenizer cannot spell as given, an empty prompt
    or answer, a masked-LM prompt without the mask token or with a number of masks that does not match the
    answer.
    """
    adapter.model.eval()
    if adapter.is_masked_lm:
        ids, positions, target = _masked(adapter, prompt, ground_truth, mask_id)
    else:
        prompt_ids, target = _causal(adapter, prompt, ground_truth, sep)
        if not prompt_ids:
            raise InputError(
                "prompt has no tokens; a causal LM needs at least one token before the ground truth")
        if not target:
            raise InputError("ground truth has no tokens; give the answer that should follow the prompt")
        ids = prompt_ids + target[:-1]
        positions = [len(prompt_ids) - 1 + i for i in range(len(target))]
    adapter.check_length(len(ids))
    return TargetInput(torch.tensor([ids], dtype=torch.long, device=adapter.device), positions, target)


def _log_probs(scores: torch.Tensor) -> torch.Tensor:
    scores = scores[0] if scores.dim() == 3 else scores
    return torch.log_softmax(scores.float(), dim=-1)


def target_log_probs(scores: torch.Tensor, target: TargetInput) -> torch.Tensor:
    """``[n_targets]`` log-probabilities of each target token at its position (``scores``: logits or
    log-probs ``[1, T, V]`` or ``[T, V]``)."""
    lp = _log_probs(scores)
    pos = torch.as_tensor(target.positions, device=lp.device)
    tok = torch.as_tensor(target.target_ids, device=lp.device)
    return lp[pos, tok]


def target_probability(adapter: LMAdapter, scores: torch.Tensor, target: TargetInput) -> float:
    """Probability of the whole ground truth: the product over its tokens of ``p(token_i | context)``
    (teacher-forced for causal LMs, all masks at once for masked LMs)."""
    return float(target_log_probs(scores, target).sum().exp())


def argmax_completion(adapter: LMAdapter, scores: torch.Tensor, target: TargetInput) -> tuple[str, float]:
    """The greedy token at each target position, as text, and the product of their probabilities."""
    lp = _log_probs(scores)[torch.as_tensor(target.positions, device=scores.device)]
    best, idx = lp.max(dim=-1)
    return adapter.vocab.detokenize(idx.tolist()), float(best.sum().exp())


@torch.no_grad()
def forward_log_probs(adapter: LMAdapter, target: TargetInput) -> torch.Tensor:
    """Log-probabilities ``[1, T, V]`` of the model on ``target.ids`` (eval mode, no gradients)."""
    adapter.model.eval()
    return adapter.log_probs(target.ids)
