"""The knowledge-neurons interface (Dai et al. 2021; API of the EleutherAI ``knowledge-neurons`` package).

>>> kn = KnowledgeNeurons(adapter)                       # any LMAdapter: causal LM or BERT masked LM
>>> scores = kn.get_scores("The capital of France is", "Paris", steps=20)      # [layers, d_ff]
>>> neurons = kn.get_refined_neurons(prompts, "Paris", p=0.5, coarse_adaptive_threshold=0.3)
>>> results, undo = kn.suppress_knowledge("The capital of France is", "Paris", neurons)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError
from fflayers.neurons.attribution import (
    alpha_grid,
    attributed_point,
    check_batch_size,
    check_convention,
    check_steps,
    integrated_gradients,
)
from fflayers.neurons.selection import Neuron, check_share, check_threshold, coarse_neurons, refine_neurons
from fflayers.neurons.targets import TextOrIds, encode_target

Example = TextOrIds | tuple[TextOrIds, TextOrIds]


class KnowledgeNeurons:
    """Find the FFN neurons that express a fact, and switch or edit them.

    ``convention="paper"``: attribute the FFN coefficients (post-activation; Llama ``act(gate) * up``) with
    ``alpha = k / m, k = 1..m``. ``convention="kn-package"``: reproduce the knowledge-neurons package's
    numbers (pre-activation ``fc`` output for causal LMs, post-activation for BERT;
    ``alpha = linspace(0, 1, m)``). Both: ``Attr = (a - baseline) * sum_k dP(target)/dx / m``, ``baseline`` 0
    unless given. The methods take the package's keywords (``quiet`` for its progress bars); fflayers' own
    functions take ``progress: bool``.
    """

    def __init__(self, adapter: LMAdapter, convention: str = "paper",
                 baseline: float | torch.Tensor = 0.0) -> None:
        self.adapter = adapter
        self.convention = check_convention(convention)
        self.baseline = baseline
        adapter.model.eval()

    @property
    def point(self) -> str:
        """The hook point attributed (``mlp_coef`` or ``mlp_key``)."""
        return attributed_point(self.adapter, self.convention)

    # ----- attribution ---------------------------------------------------------------------------------
    def get_scores(self, prompt: TextOrIds, ground_truth: TextOrIds, batch_size: int = 10, steps: int = 20,
                   quiet: bool = True, layers: Sequence[int] | None = None) -> torch.Tensor:
        """Integrated-gradients attributions ``[n_layers, d_ff]`` (detached) of the ground truth's
        probability.

        ``batch_size`` is the number of (layer, alpha) rows per forward/backward pass: any positive number; a
        larger one is faster where memory allows (``n_layers * steps`` does every layer in one pass).
        ``layers``: score only these (the others are 0), e.g. the upper half to save time."""
        check_batch_size(batch_size)
        alphas = alpha_grid(steps, self.convention)
        target = encode_target(self.adapter, prompt, ground_truth)
        chosen = list(range(self.adapter.n_layers)) if layers is None else sorted(
            {self.adapter.check_layer(int(x)) for x in layers})
        part = integrated_gradients(self.adapter, target, self.point, alphas, batch_size=batch_size,
                                    layers=chosen, baseline=self.baseline, progress=not quiet)
        if len(chosen) == self.adapter.n_layers:
            return part
        scores = part.new_zeros(self.adapter.n_layers, part.shape[1])
        scores[chosen] = part
        return scores

    def get_coarse_neurons(self, prompt: TextOrIds, ground_truth: TextOrIds, batch_size: int = 10,
                           steps: int = 20, threshold: float | None = None,
                           adaptive_threshold: float | None = None, percentile: float | None = None,
                           quiet: bool = True, layers: Sequence[int] | None = None) -> list[Neuron]:
        """Neurons whose attribution exceeds exactly one of: ``threshold`` (absolute), ``adaptive_threshold``
        times the largest attribution, the ``percentile``-th percentile of all attributions (``layers``: see
        :meth:`get_scores`)."""
        check_threshold(threshold, adaptive_threshold, percentile)
        check_batch_size(batch_size)
        check_steps(steps)
        scores = self.get_scores(prompt, ground_truth, batch_size=batch_size, steps=steps, quiet=quiet,
                                 layers=layers)
        return coarse_neurons(scores, threshold, adaptive_threshold, percentile)

    def get_refined_neurons(self, prompts: Sequence[TextOrIds], ground_truth: TextOrIds,
                            negative_examples: Sequence[Example] | None = None, p: float = 0.5,
                            batch_size: int = 10, steps: int = 20,
                            coarse_adaptive_threshold: float | None = 0.3,
                            coarse_threshold: float | None = None, coarse_percentile: float | None = None,
                            quiet: bool = False, layers: Sequence[int] | None = None) -> list[Neuron]:
        """Neurons in the coarse sets of more than ``p`` of the prompts, minus every neuron in the coarse set
        of a negative example (a prompt for the same ground truth, or a ``(prompt, ground_truth)`` pair,
        expressing a different fact). The coarse threshold is exactly one of the three ``coarse_*`` (set the
        default ``coarse_adaptive_threshold=None`` to use another). ``layers``: see :meth:`get_scores`."""
        if isinstance(prompts, str) or not prompts:
            raise InputError("prompts must be a non-empty list of prompts expressing the same fact")
        if isinstance(negative_examples, str):
            raise InputError("negative_examples must be a list of prompts (or (prompt, ground_truth) pairs)")
        cuts = {"threshold": coarse_threshold, "adaptive_threshold": coarse_adaptive_threshold,
                "percentile": coarse_percentile}
        check_threshold(**cuts, prefix="coarse_")
        check_share(p)
        check_batch_size(batch_size)
        check_steps(steps)
        examples = [(x, ground_truth) for x in prompts]
        negatives = [x if isinstance(x, tuple) else (x, ground_truth) for x in negative_examples or ()]
        for prompt, truth in examples + negatives:  # bad input fails before any long computation
            encode_target(self.adapter, prompt, truth)

        def coarse(items: list[tuple[TextOrIds, TextOrIds]], desc: str) -> list[list[Neuron]]:
            return [self.get_coarse_neurons(prompt, truth, batch_size, steps, **cuts, layers=layers)
                    for prompt, truth in tqdm(items, desc=desc, disable=quiet)]

        found = coarse(examples, "prompts")
        negative = coarse(negatives, "negative examples") if negatives else None
        return refine_neurons(found, p, negative)

    # ----- modifications (fflayers.neurons.modify) -----------------------------------------------------
    def suppress_knowledge(self, *args, **kwargs):
        """Set the neurons' activations to 0 and measure the ground truth; see
        :func:`modify.suppress_knowledge`."""
        from fflayers.neurons import modify

        return modify.suppress_knowledge(self.adapter, *args, **kwargs)

    def enhance_knowledge(self, *args, **kwargs):
        """Double the neurons' activations and measure; see :func:`modify.enhance_knowledge`."""
        from fflayers.neurons import modify

        return modify.enhance_knowledge(self.adapter, *args, **kwargs)

    def erase_knowledge(self, *args, **kwargs):
        """Set the neurons' value vectors to 0 or the [UNK] embedding; see :func:`modify.erase_knowledge`."""
        from fflayers.neurons import modify

        return modify.erase_knowledge(self.adapter, *args, **kwargs)

    def edit_knowledge(self, *args, **kwargs):
        """Move the neurons' value vectors from the old answer's embedding to the new one's; see
        :func:`modify.edit_knowledge`."""
        from fflayers.neurons import modify

        return modify.edit_knowledge(self.adapter, *args, **kwargs)
