"""Matplotlib figures of the analyses, saved atomically as PNG and PDF.

Figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot, no global backend change), so
they render headless (Agg) and never open windows. Each ``plot_*`` function takes result tables and returns a
Figure; :func:`save_figure` writes it. One module per analysis, shared helpers in
:mod:`fflayers.plots.figures`; every public name is importable from ``fflayers.plots``.

Key-value memories (seed 000, :mod:`fflayers.plots.memories`):

* :func:`plot_agreement`: per layer, the share of values whose top-1 token is the target of at least one of
  their key's trigger examples, and the paper's agreement rate (top-1 = the top trigger example's target),
  with the same for random vectors as a baseline;
* :func:`plot_confident_values`: in which layers the most confident values (largest ``max_prob``) are;
* :func:`plot_active_memories`: share (or number) of active memories per layer;
* :func:`plot_top1_matches`: how often the layer's top-1 equals some memory's top-1, the residual's top-1,
  or neither;
* :func:`plot_coefficients`: distribution of the scaled coefficients ``m_i ||v_i||`` per layer.

Parameters in embedding space (seed 004, :mod:`fflayers.plots.embedding_space`):

* :func:`plot_token_map`: a 2-D (t-SNE) map of a vector's top tokens, labelled, coloured by score;
* :func:`plot_neurons_vs_hidden`: per layer, the overlap of the hidden state's top tokens with those of its
  most active values, beside random values.

Linear shortcuts (seed 002, :mod:`fflayers.plots.shortcuts`):

* :func:`plot_r2_heatmap`: r^2 of ``mat`` and ``id`` for every pair of states (i, j), side by side;
* :func:`plot_shortcut_precision`: precision@k and surprisal per layer for each mapping;
* :func:`plot_early_exit`: precision@1 against the layers saved, over the lambda grid, per mapping;
* :func:`plot_submodule_r2`: r^2 of each submodule's linear map and of the identity, per layer.

Knowledge neurons (seed 003, :mod:`fflayers.plots.neurons`):

* :func:`plot_knowledge_neuron_effects`: per relation, the % change of the correct answer's probability when
  the refined neurons are suppressed / enhanced, on related and unrelated prompts, beside random neurons.

Dissecting factual recall (seed 001, :mod:`fflayers.plots.recall`):

* :func:`plot_knockout_curves`: attention knockout, the mean relative change of the predicted token's
  probability per layer, one line per blocked position set;
* :func:`plot_extraction_rates`: attribute extraction rate per layer, MHSA vs MLP, per variant;
* :func:`plot_attributes_rate`: subject enrichment, attributes rate per layer against the embedding baseline;
* :func:`plot_sublayer_knockout`: attributes rate and attribute probability when MLP or MHSA sublayers of a
  window of layers are knocked out, per first knocked-out layer.

Lenses compared (:mod:`fflayers.plots.lenses`):

* :func:`plot_lens_comparison`: one panel per metric (KL, cross-entropy, top-1 agreement, precision@k,
  surprisal, marginal KL), a line per lens, against the state index.
"""

from fflayers.plots.embedding_space import plot_neurons_vs_hidden, plot_token_map
from fflayers.plots.figures import save_figure
from fflayers.plots.lenses import plot_lens_comparison
from fflayers.plots.memories import (
    plot_active_memories,
    plot_agreement,
    plot_coefficients,
    plot_confident_values,
    plot_top1_matches,
)
from fflayers.plots.neurons import plot_knowledge_neuron_effects
from fflayers.plots.recall import (
    plot_attributes_rate,
    plot_extraction_rates,
    plot_knockout_curves,
    plot_sublayer_knockout,
)
from fflayers.plots.shortcuts import (
    plot_early_exit,
    plot_r2_heatmap,
    plot_shortcut_precision,
    plot_submodule_r2,
)

__all__ = [
    "save_figure",
    "plot_agreement",
    "plot_confident_values",
    "plot_active_memories",
    "plot_top1_matches",
    "plot_coefficients",
    "plot_token_map",
    "plot_neurons_vs_hidden",
    "plot_r2_heatmap",
    "plot_shortcut_precision",
    "plot_early_exit",
    "plot_knowledge_neuron_effects",
    "plot_knockout_curves",
    "plot_extraction_rates",
    "plot_attributes_rate",
    "plot_sublayer_knockout",
    "plot_submodule_r2",
    "plot_lens_comparison",
]
