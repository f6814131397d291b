"""Knowledge-neuron interventions: suppress, enhance, erase, edit.

Neurons are ``[layer, neuron]`` pairs. Two kinds of change:

* activation edits (:func:`suppress_knowledge`: set to 0; :func:`enhance_knowledge`: doubled), made with
  :func:`fflayers.hooks.intervene` at the hook point the ``convention`` attributes
  (:func:`fflayers.neurons.attribution.attributed_point`) and only at the positions that predict the answer
  (causal LMs: the last prompt position and, for a multi-token answer, the teacher-forced positions after it;
  masked LMs: the mask positions). ``convention="paper"`` (default) scales the coefficient ``m_i``
  (``mlp_coef``, after the activation function): enhance gives ``2 * act(k_i)``. ``convention="kn-package"``
  does what the knowledge-neurons package does: on causal LMs it scales the key projection's output
  (``mlp_key``, before the activation; GPT-2's ``mlp.c_fc``), so enhance gives ``act(2 k_i)``; on BERT it
  scales the coefficient, as ``"paper"`` does. Suppress gives ``act(0) = 0`` either way for GELU / ReLU /
  SiLU models;
* weight edits of the neurons' value vectors ``v_i`` (:func:`erase_knowledge`: ``v_i <- 0`` or the output
  embedding of the unknown token; :func:`edit_knowledge`: ``v_i <- v_i - 2 e(old) + 2 e(new)``, ``e`` the
  output embedding), in place through :meth:`LMAdapter.write_ffn_values`, with an exact undo (the original
  rows are saved and written back).

Each function measures the answer before and after the change and returns a :class:`Modification`, which is a
``(results, undo)`` pair::

    results, undo = suppress_knowledge(adapter, "The capital of France is", "Paris", neurons)
    results["before"]["gt_prob"], results["after"]["gt_prob"]

``quiet=False`` prints the measurements before and after (the knowledge-neurons package's default; here the
default is ``quiet=True``).

``undo_modification=True`` (the default) undoes the change right after measuring (``undo`` is then a no-op);
``False`` leaves it in place until ``undo()`` is called. As a context manager the change holds inside the
block (re-applied if it was already undone) and is undone on exit, also when the body raises::

    with enhance_knowledge(adapter, prompt, "Paris", neurons) as results:
        ...  # forward passes here see the doubled activations

Several changes left in place must be undone in reverse order. An activation edit left in place keeps acting
on the same absolute positions of any later input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from typing import Any

import torch

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError
from fflayers.hooks import intervene, scale
from fflayers.neurons.attribution import attributed_point

Neurons = Iterable[Sequence[int]]
#: prompts and answers are text, or token-id lists for models without a tokenizer (see
#: fflayers.neurons.targets)
TextOrIds = str | Sequence[int]

__all__ = [
    "Modification",
    "enhance_knowledge",
    "edit_knowledge",
    "erase_knowledge",
    "neurons_by_layer",
    "suppress_knowledge",
]


class Modification(tuple):
    """``(results, undo)`` of a modification; also a context manager (see the module docstring).

    ``undo()`` restores the model and may be called any number of times; ``active`` says whether the change
    is in place now.
    """

    def __new__(cls, results: dict, apply: Callable[[], None], revert: Callable[[], None], active: bool):
        self = super().__new__(cls, (results, None))
        self._apply, self._revert, self.active = apply, revert, active
        return self

    @property
    def results(self) -> dict:
        return self[0]

    def __iter__(self):
        yield self[0]
        yield self.undo

    def __getitem__(self, i):
        return self.undo if i in (1, -1) else super().__getitem__(i)

    def __repr__(self) -> str:
        return f"Modification(results={self[0]!r}, active={self.active})"

    def undo(self) -> None:
        """Restore the model (a no-op when the change is not in place)."""
        if self.active:
            self.active = False
            self._revert()

    def __enter__(self) -> dict:
        if not self.active:
            self._apply()
            self.active = True
        return self.results

    def __exit__(self, *exc: Any) -> bool:
        self.undo()
        return False


# ----- helpers ---------------------------------------------------------------------------------------------


def neurons_by_layer(adapter: LMAdapter, neurons: Neurons) -> dict[int, list[int]]:
    """``{layer: [neuron, ...]}`` of ``[layer, neuron]`` pairs (duplicates dropped, order kept), checked
    against the model's size; one-line :class:`~fflayers.core.InputError` for a pair out of range."""
    out: dict[int, list[int]] = {}
    for pair in neurons:
        try:
            layer, neuron = (int(x) for x in pair)
        except (TypeError, ValueError):
            raise InputError(f"neuron {pair!r} is not a [layer, neuron] pair of integers") from None
        if not 0 <= layer < adapter.n_layers:
            raise InputError(f"neuron [{layer}, {neuron}] is out of range: the model has {adapter.n_layers} "
                             f"layers (0..{adapter.n_layers - 1})")
        if not 0 <= neuron < adapter.d_ff:
            raise InputError(f"neuron [{layer}, {neuron}] is out of range: layers have {adapter.d_ff} "
                             f"neurons (0..{adapter.d_ff - 1})")
        row = out.setdefault(layer, [])
        if neuron not in row:
            row.append(neuron)
    return out


def _measure(adapter: LMAdapter, target, with_gt: bool = True) -> dict:
    from fflayers.neurons.targets import argmax_completion, target_probability

    with torch.no_grad():
        log_probs = adapter.log_probs(target.ids)
        text, prob = argmax_completion(adapter, log_probs, target)
        gt = target_probability(adapter, log_probs, target) if with_gt else None
    return {"gt_prob": None if gt is None else float(gt), "argmax_completion": text,
            "argmax_prob": float(prob)}


def _report(results: dict) -> None:
    """Print the measurements before and after a change (what ``quiet=False`` shows)."""
    for when in ("before", "after"):
        m = results[when]
        gt = "-" if m["gt_prob"] is None else f"{m['gt_prob']:.6g}"
        print(f"{when} modification: ground-truth probability {gt}, argmax completion "
              f"{m['argmax_completion']!r} (probability {m['argmax_prob']:.6g})")


def _run(adapter: LMAdapter, target, apply, revert, undo_modification: bool, with_gt: bool = True,
         extra: dict | None = None, quiet: bool = True) -> Modification:
    """Measure, apply, measure again, undo (unless asked not to); the model is restored on any error."""
    adapter.model.eval()
    results: dict[str, Any] = {"before": _measure(adapter, target, with_gt)}
    apply()
    try:
        results["after"] = _measure(adapter, target, with_gt)
    except BaseException:
        revert()
        raise
    results.update(extra or {})
    if not quiet:
        _report(results)
    if undo_modification:
        revert()
    return Modification(results, apply, revert, active=not undo_modification)


def _activation_change(adapter: LMAdapter, target, neurons: Neurons, factor: float, point: str = "mlp_coef"):
    groups = neurons_by_layer(adapter, neurons)
    edits = [scale(point, layer, factor, positions=list(target.positions), index=idx)
             for layer, idx in groups.items()]
    stack = ExitStack()

    def apply() -> None:
        stack.enter_context(intervene(adapter, edits))

    return apply, stack.close


def _weight_change(adapter: LMAdapter, groups: dict[int, list[int]],
                   new_rows: Callable[[int, torch.Tensor], torch.Tensor]):
    """apply / revert writing ``new_rows(layer, original_rows)`` into the value rows of ``groups``."""
    with torch.no_grad():
        original = {layer: adapter.ffn_values(layer)[idx].clone() for layer, idx in groups.items()}
        replaced = {layer: new_rows(layer, rows) for layer, rows in original.items()}

    def write(rows_of: dict[int, torch.Tensor]) -> None:
        for layer, idx in groups.items():
            adapter.write_ffn_values(layer, idx, rows_of[layer])

    return (lambda: write(replaced)), (lambda: write(original))


def _output_embedding(adapter: LMAdapter, token_id: int) -> torch.Tensor:
    return adapter.output_embeddings()[int(token_id)].detach().clone()


# ----- activation edits ------------------------------------------------------------------------------------


def suppress_knowledge(adapter: LMAdapter, prompt: TextOrIds, ground_truth: TextOrIds, neurons: Neurons,
                       undo_modification: bool = True, quiet: bool = True,
                       convention: str = "paper") -> Modification:
    """Set the neurons' activations to 0 at the answer's positions; probability of ``ground_truth`` before
    and after. ``convention``: the hook point set to 0, ``mlp_coef`` (``"paper"``) or the point
    ``"kn-package"`` attributes (``mlp_key``, the pre-activation, on causal LMs; see the module docstring).
    ``quiet=False`` prints the measurements."""
    return _scale_knowledge(adapter, prompt, ground_truth, neurons, 0.0, undo_modification, quiet, convention)


def enhance_knowledge(adapter: LMAdapter, prompt: TextOrIds, ground_truth: TextOrIds, neurons: Neurons,
                      undo_modification: bool = True, quiet: bool = True,
                      convention: str = "paper") -> Modification:
    """Double the neurons' activations at the answer's positions; probability of ``ground_truth`` before and
    after. ``convention="paper"`` doubles the coefficient (``mlp_coef``: ``2 * act(k)``);
    ``convention="kn-package"`` doubles what the knowledge-neurons package doubles: on causal LMs the key
    projection's output before the activation (``mlp_key``, GPT-2's ``mlp.c_fc``: ``act(2 k)``), on BERT the
    coefficient. ``quiet=False`` prints the measurements."""
    return _scale_knowledge(adapter, prompt, ground_truth, neurons, 2.0, undo_modification, quiet, convention)


def _scale_knowledge(adapter: LMAdapter, prompt: TextOrIds, ground_truth: TextOrIds, neurons: Neurons,
                     factor: float, undo_modification: bool, quiet: bool = True,
                     convention: str = "paper") -> Modification:
    """The neurons' activations at ``convention``'s hook point times ``factor`` at the answer's positions,
    measured before and after."""
    from fflayers.neurons.targets import encode_target

    point = attributed_point(adapter, convention)
    target = encode_target(adapter, prompt, ground_truth)
    apply, revert = _activation_change(adapter, target, neurons, factor, point)
    return _run(adapter, target, apply, revert, undo_modification, quiet=quiet)


# ----- weight edits ----------------------------------------------------------------------------------------


def erase_knowledge(adapter: LMAdapter, prompt: TextOrIds, neurons: Neurons, erase_value: str = "zero",
                    target: TextOrIds | None = None, undo_modification: bool = True,
                    quiet: bool = True) -> Modification:
    """Set the neurons' value vectors to zero (``erase_value="zero"``) or to the output embedding of the
    unknown token (``"unk"``; the input embedding where input and output are tied, never a position
    embedding). With ``target`` its probability is measured (``gt_prob``); without, ``gt_prob`` is None and
    the prediction is read where the prompt's answer would go (causal: after the prompt; masked: the
    masks). ``quiet=False`` prints the measurements."""
    if erase_value not in ("zero", "unk"):
        raise InputError(f"erase_value {erase_value!r} is not supported; use 'zero' or 'unk'")
    groups = neurons_by_layer(adapter, neurons)
    if erase_value == "unk":
        unk_token = adapter.vocab.unk_id
        if unk_token is None:
            raise InputError("the vocabulary has no unknown token to erase with; use erase_value='zero'")
        unk = _output_embedding(adapter, unk_token)

        def fill(_layer: int, rows: torch.Tensor) -> torch.Tensor:
            return unk.to(rows.device, rows.dtype).expand_as(rows).clone()
    else:

        def fill(_layer: int, rows: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(rows)

    encoded = _prompt_target(adapter, prompt) if target is None else _encode(adapter, prompt, target)
    apply, revert = _weight_change(adapter, groups, fill)
    return _run(adapter, encoded, apply, revert, undo_modification, with_gt=target is not None, quiet=quiet)


def edit_knowledge(adapter: LMAdapter, prompt: TextOrIds, target: TextOrIds, neurons: Neurons,
                   undo_modification: bool = True, quiet: bool = True) -> Modification:
    """Rewrite the neurons' value vectors ``v_i <- v_i - 2 e(old) + 2 e(new)``, ``e`` the output embedding:
    ``old`` is the model's own top prediction for the first answer token before the edit, ``new`` the first
    token of ``target``. ``gt_prob`` is the probability of ``target``; ``results["target"]`` and
    ``results["old"]`` name the two tokens' texts. ``quiet=False`` prints the measurements."""
    encoded = _encode(adapter, prompt, target)
    groups = neurons_by_layer(adapter, neurons)
    with torch.no_grad():
        old_id = int(adapter.log_probs(encoded.ids)[0, encoded.positions[0]].argmax())
    new_id = int(encoded.target_ids[0])
    delta = 2.0 * (_output_embedding(adapter, new_id) - _output_embedding(adapter, old_id))

    def shift(_layer: int, rows: torch.Tensor) -> torch.Tensor:
        return rows + delta.to(rows.device, rows.dtype)

    apply, revert = _weight_change(adapter, groups, shift)
    extra = {"target": target, "old": adapter.vocab.detokenize([old_id])}
    return _run(adapter, encoded, apply, revert, undo_modification, extra=extra, quiet=quiet)


def _encode(adapter: LMAdapter, prompt: TextOrIds, answer: TextOrIds):
    from fflayers.neurons.targets import encode_target

    return encode_target(adapter, prompt, answer)


def _prompt_target(adapter: LMAdapter, prompt: TextOrIds):
    """A target made of the model's own greedy prediction(s) for ``prompt`` (used when no answer is given)."""
    from fflayers.neurons.targets import TargetInput

    ids = adapter.vocab.tokenize(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
    ids = torch.tensor([ids], dtype=torch.long, device=adapter.device)
    if adapter.is_masked_lm:
        mask_id = adapter.vocab.mask_id
        if mask_id is None:
            raise InputError("this masked LM has no mask token id; load its tokenizer")
        positions = (ids[0] == mask_id).nonzero().flatten().tolist()
        if not positions:
            raise InputError(f"masked-LM prompt {prompt!r} holds no mask token; "
                             "put one where the answer goes")
        with torch.no_grad():
            greedy = adapter.log_probs(ids)[0, positions].argmax(-1).tolist()
        return TargetInput(ids=ids, positions=positions, target_ids=greedy)
    with torch.no_grad():
        greedy = int(adapter.log_probs(ids)[0, -1].argmax())
    full = torch.cat([ids, torch.tensor([[greedy]], device=adapter.device)], dim=1)
    return TargetInput(ids=full, positions=[ids.shape[1] - 1], target_ids=[greedy])
