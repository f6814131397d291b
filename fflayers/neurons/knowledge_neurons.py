"""The knowledge-neurons interface (Dai et al. 2021; API of the EleutherAI ``knowledge-neurons`` package).

>>> kn = KnowledgeNeurons(adapter)                       # any LMAdapter: causal LM or BERT masked LM
>>> scores = kn.get_scores("The capital of France is", "Paris", steps=20)      # [layers, d_ff]
>>> neurons = kn.get_refined_neurons(prompts, "Paris", p=0.5, coarse_adaptive_threshold=0.3)
>>> results, undo = kn.suppress_knowledge("The capital of France is", "Paris", neurons, quiet=True)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError
from fflayers.neurons import modify
from fflayers.neurons.attribution import (
    alpha_grid,
    attributed_point,
    check_attribution_method,
    check_batch_size,
    check_convention,
    check_steps,
    integrated_gradients,
    target_activations,
)
from fflayers.neurons.modify import Modification
from fflayers.neurons.selection import Neuron, check_share, check_threshold, coarse_neurons, refine_neurons
from fflayers.neurons.targets import TextOrIds, encode_target

Example = TextOrIds | tuple[TextOrIds, TextOrIds]


class KnowledgeNeurons:
    """Find the FFN neurons that express a fact, and switch or edit them.

    ``convention="paper"``: attribute the FFN coefficients (post-activation; Llama ``act(gate) * up``) with
    ``alpha = k / m, k = 1..m``. ``convention="kn-package"``: reproduce the knowledge-neurons package's
    numbers (pre-activation ``fc`` output for causal LMs, post-activation for BERT;
    ``alpha = linspace(0, 1, m)``). Both: ``Attr = (a - baseline) * sum_k dP(target)/dx / m``, ``baseline`` 0
    unless given. Suppress and enhance act on the attributed point: under ``"kn-package"`` enhance doubles
    the key projection's output before the activation on causal LMs (GPT-2's ``mlp.c_fc``: ``GELU(2 k)``,
    as the package does), under ``"paper"`` the coefficient (``2 GELU(k)``).

    Every method takes the package's arguments, with its names, order and defaults: ``pbar`` (attribution)
    and ``quiet`` (refined neurons) switch the progress bars; the modifications print their measurements
    unless ``quiet``. fflayers' own keyword-only extras: ``quiet`` and ``layers`` on the attribution methods
    (``layers``: score only these), ``attribution_method`` on :meth:`get_refined_neurons`.
    """

    def __init__(self, adapter: LMAdapter, convention: str = "paper",
                 baseline: float | torch.Tensor = 0.0) -> None:
        self.adapter = adapter
        self.convention = check_convention(convention)
        self.baseline = baseline
        adapter.model.eval()

    @property
    def point(self) -> str:
        """The hook point attributed, suppressed and enhanced (``mlp_coef`` or ``mlp_key``)."""
        return attributed_point(self.adapter, self.convention)

    def n_layers(self) -> int:
        """Number of transformer blocks."""
        return self.adapter.n_layers

    def intermediate_size(self) -> int:
        """Neurons per FFN (``d_ff``)."""
        return self.adapter.d_ff

    # ----- attribution ---------------------------------------------------------------------------------
    def _scores(self, prompt: TextOrIds, ground_truth: TextOrIds, batch_size: int, steps: int,
                attribution_method: str, layers: list[int], progress: bool) -> torch.Tensor:
        """``[len(layers), d_ff]`` scores of the chosen layers (arguments checked here)."""
        check_attribution_method(attribution_method)
        check_batch_size(batch_size)
        check_steps(steps)
        target = encode_target(self.adapter, prompt, ground_truth)
        if attribution_method == "max_activations":
            return target_activations(self.adapter, target, self.point, layers).mean(dim=1)
        alphas = alpha_grid(steps, self.convention)
        return integrated_gradients(self.adapter, target, self.point, alphas, batch_size=batch_size,
                                    layers=layers, baseline=self.baseline, progress=progress)

    def get_scores(self, prompt: TextOrIds, ground_truth: TextOrIds, batch_size: int = 10, steps: int = 20,
                   attribution_method: str = "integrated_grads", pbar: bool = True, *, quiet: bool = False,
                   layers: Sequence[int] | None = None) -> torch.Tensor:
        """Attributions ``[n_layers, d_ff]`` (detached) of the ground truth's probability.

        ``attribution_method``: ``"integrated_grads"`` (integrated gradients) or ``"max_activations"`` (the
        activations at the attributed point, at the positions predicting the answer, averaged over its
        tokens). ``batch_size`` is the number of (layer, alpha) rows per forward/backward pass: any positive
        number; a larger one is faster where memory allows (``n_layers * steps`` does every layer in one
        pass). A progress bar shows with ``pbar`` unless ``quiet``. ``layers``: score only these (the others
        are 0), e.g. the upper half to save time."""
        chosen = list(range(self.adapter.n_layers)) if layers is None else sorted(
            {self.adapter.check_layer(int(x)) for x in layers})
        part = self._scores(prompt, ground_truth, batch_size, steps, attribution_method, chosen,
                            progress=pbar and not quiet)
        if len(chosen) == self.adapter.n_layers:
            return part
        scores = part.new_zeros(self.adapter.n_layers, part.shape[1])
        scores[chosen] = part
        return scores

    def get_scores_for_layer(self, prompt: TextOrIds, ground_truth: TextOrIds, layer_idx: int,
                             batch_size: int = 10, steps: int = 20, encoded_input=None,
                             attribution_method: str = "integrated_grads") -> torch.Tensor:
        """The ``[d_ff]`` scores of one layer (see :meth:`get_scores`). ``encoded_input`` is accepted for
        the package's signature and not used: the prompt is always encoded from ``prompt``."""
        layer = self.adapter.check_layer(int(layer_idx))
        return self._scores(prompt, ground_truth, batch_size, steps, attribution_method, [layer],
                            progress=False)[0]

    def get_coarse_neurons(self, prompt: TextOrIds, ground_truth: TextOrIds, batch_size: int = 10,
                           steps: int = 20, threshold: float | None = None,
                           adaptive_threshold: float | None = None, percentile: float | None = None,
                           attribution_method: str = "integrated_grads", pbar: bool = True, *,
                           quiet: bool = False, layers: Sequence[int] | None = None) -> list[Neuron]:
        """Neurons whose attribution exceeds exactly one of: ``threshold`` (absolute), ``adaptive_threshold``
        times the largest attribution, the ``percentile``-th percentile of all attributions (the other
        arguments: see :meth:`get_scores`)."""
        check_threshold(threshold, adaptive_threshold, percentile)
        check_attribution_method(attribution_method)
        check_batch_size(batch_size)
        check_steps(steps)
        scores = self.get_scores(prompt, ground_truth, batch_size=batch_size, steps=steps,
                                 attribution_method=attribution_method, pbar=pbar, quiet=quiet,
                                 layers=layers)
        return coarse_neurons(scores, threshold, adaptive_threshold, percentile)

    def get_refined_neurons(self, prompts: Sequence[TextOrIds], ground_truth: TextOrIds,
                            negative_examples: Sequence[Example] | None = None, p: float = 0.5,
                            batch_size: int = 10, steps: int = 20,
                            coarse_adaptive_threshold: float | None = 0.3,
                            coarse_threshold: float | None = None, coarse_percentile: float | None = None,
                            quiet: bool = False, *, attribution_method: str = "integrated_grads",
                            layers: Sequence[int] | None = None) -> list[Neuron]:
        """Neurons in the coarse sets of more than ``p`` of the prompts, minus every neuron in the coarse set
        of a negative example (a prompt for the same ground truth, or a ``(prompt, ground_truth)`` pair,
        expressing a different fact). The coarse threshold is exactly one of the three ``coarse_*`` (set the
        default ``coarse_adaptive_threshold=None`` to use another). ``quiet`` hides the progress bars over
        the prompts. ``attribution_method``, ``layers``: see :meth:`get_scores`."""
        if isinstance(prompts, str) or not prompts:
            raise InputError("prompts must be a non-empty list of prompts expressing the same fact")
        if isinstance(negative_examples, str):
            raise InputError("negative_examples must be a list of prompts (or (prompt, ground_truth) pairs)")
        cuts = {"threshold": coarse_threshold, "adaptive_threshold": coarse_adaptive_threshold,
                "percentile": coarse_percentile}
        check_threshold(**cuts, prefix="coarse_")
        check_share(p)
        check_attribution_method(attribution_method)
        check_batch_size(batch_size)
        check_steps(steps)
        examples = [(x, ground_truth) for x in prompts]
        negatives = [x if isinstance(x, tuple) else (x, ground_truth) for x in negative_examples or ()]
        for prompt, truth in examples + negatives:  # bad input fails before any long computation
            encode_target(self.adapter, prompt, truth)

        def coarse(items: list[tuple[TextOrIds, TextOrIds]], desc: str) -> list[list[Neuron]]:
            return [self.get_coarse_neurons(prompt, truth, batch_size, steps, **cuts,
                                            attribution_method=attribution_method, pbar=False,
                                            layers=layers)
                    for prompt, truth in tqdm(items, desc=desc, disable=quiet)]

        found = coarse(examples, "prompts")
        negative = coarse(negatives, "negative examples") if negatives else None
        return refine_neurons(found, p, negative)

    # ----- modifications (fflayers.neurons.modify) -----------------------------------------------------
    def suppress_knowledge(self, prompt: TextOrIds, ground_truth: TextOrIds, neurons: Sequence[Neuron],
                           undo_modification: bool = True, quiet: bool = False) -> Modification:
        """Set the neurons' activations at :attr:`point` to 0 at the answer's positions and measure the
        ground truth; ``(results, undo)``, see :func:`modify.suppress_knowledge`."""
        return modify.suppress_knowledge(self.adapter, prompt, ground_truth, neurons,
                                         undo_modification=undo_modification, quiet=quiet,
                                         convention=self.convention)

    def enhance_knowledge(self, prompt: TextOrIds, ground_truth: TextOrIds, neurons: Sequence[Neuron],
                          undo_modification: bool = True, quiet: bool = False) -> Modification:
        """Double the neurons' activations at :attr:`point` at the answer's positions and measure:
        ``"kn-package"`` on a causal LM doubles the pre-activation (``act(2 k)``, as the package does),
        ``"paper"`` the coefficient (``2 act(k)``); see :func:`modify.enhance_knowledge`."""
        return modify.enhance_knowledge(self.adapter, prompt, ground_truth, neurons,
                                        undo_modification=undo_modification, quiet=quiet,
                                        convention=self.convention)

    def modify_activations(self, prompt: TextOrIds, ground_truth: TextOrIds, neurons: Sequence[Neuron],
                           mode: str = "suppress", undo_modification: bool = True,
                           quiet: bool = False) -> Modification:
        """:meth:`suppress_knowledge` (``mode="suppress"``) or :meth:`enhance_knowledge` (``"enhance"``)."""
        methods = {"suppress": self.suppress_knowledge, "enhance": self.enhance_knowledge}
        if mode not in methods:
            raise InputError(f"mode {mode!r} is not supported; use 'suppress' or 'enhance'")
        return methods[mode](prompt, ground_truth, neurons, undo_modification=undo_modification, quiet=quiet)

    def erase_knowledge(self, prompt: TextOrIds, neurons: Sequence[Neuron], erase_value: str = "zero",
                        target: TextOrIds | None = None, undo_modification: bool = True,
                        quiet: bool = False) -> Modification:
        """Set the neurons' value vectors to 0 or the [UNK] embedding; see :func:`modify.erase_knowledge`."""
        return modify.erase_knowledge(self.adapter, prompt, neurons, erase_value=erase_value, target=target,
                                      undo_modification=undo_modification, quiet=quiet)

    def edit_knowledge(self, prompt: TextOrIds, target: TextOrIds, neurons: Sequence[Neuron],
                       undo_modification: bool = True, quiet: bool = False) -> Modification:
        """Move the neurons' value vectors from the old answer's embedding to the new one's; see
        :func:`modify.edit_knowledge`."""
        return modify.edit_knowledge(self.adapter, prompt, target, neurons,
                                     undo_modification=undo_modification, quiet=quiet)

    def modify_weights(self, prompt: TextOrIds, neurons: Sequence[Neuron], target: TextOrIds | None,
                       mode: str = "edit", erase_value: str = "zero", undo_modification: bool = True,
                       quiet: bool = False) -> Modification:
        """:meth:`edit_knowledge` (``mode="edit"``; ``erase_value`` unused) or :meth:`erase_knowledge`
        (``"erase"``)."""
        if mode == "edit":
            if target is None:
                raise InputError("mode='edit' needs a target: the answer to write into the neurons")
            return self.edit_knowledge(prompt, target, neurons, undo_modification=undo_modification,
                                       quiet=quiet)
        if mode == "erase":
            return self.erase_knowledge(prompt, neurons, erase_value=erase_value, target=target,
                                        undo_modification=undo_modification, quiet=quiet)
        raise InputError(f"mode {mode!r} is not supported; use 'edit' or 'erase'")
