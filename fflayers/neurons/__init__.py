"""Knowledge neurons (Dai et al. 2021): integrated-gradients attribution of FFN neurons, coarse and refined
neuron selection, and interventions on the neurons found.

Neurons are ``[layer, neuron]`` pairs everywhere.
"""

from fflayers.neurons.attribution import CONVENTIONS, alpha_grid, attributed_point, integrated_gradients
from fflayers.neurons.knowledge_neurons import KnowledgeNeurons
from fflayers.neurons.selection import check_threshold, coarse_neurons, refine_neurons
from fflayers.neurons.targets import (
    TargetInput,
    argmax_completion,
    encode_target,
    forward_log_probs,
    target_log_probs,
    target_probability,
)

__all__ = [
    "CONVENTIONS",
    "KnowledgeNeurons",
    "TargetInput",
    "alpha_grid",
    "argmax_completion",
    "attributed_point",
    "check_threshold",
    "coarse_neurons",
    "encode_target",
    "forward_log_probs",
    "integrated_gradients",
    "refine_neurons",
    "target_log_probs",
    "target_probability",
]
