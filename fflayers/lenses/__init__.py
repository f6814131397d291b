"""Lenses compared: the logit lens, linear shortcuts (mat), the tuned lens, a hybrid of the two and a
token-identity Patchscope, read and measured on the same tokens."""

from fflayers.lenses.lens import Lens, LinearShortcutLens, LogitLens, VectorLens, sequence_states
from fflayers.lenses.metrics import METRICS, evaluate_lenses
from fflayers.lenses.patchscope import IDENTITY_PROMPT, TokenIdentityPatchscope
from fflayers.lenses.training import LensTrainConfig, LensTrainingError, train_lens, train_lens_on_states
from fflayers.lenses.tuned import TunedLens, load_lens

__all__ = ["IDENTITY_PROMPT", "METRICS", "Lens", "LensTrainConfig", "LensTrainingError", "LinearShortcutLens",
           "LogitLens", "TokenIdentityPatchscope", "TunedLens", "VectorLens", "evaluate_lenses", "load_lens",
           "sequence_states", "train_lens", "train_lens_on_states"]
