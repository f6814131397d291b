"""Linear shortcuts between layers ("Jump to Conclusions", Yom Din et al. 2023).

State 0 is the residual stream entering block 0, state l (1..L) the output of block l - 1 (before the final
norm). Maps act on column vectors, ``x_j ≈ A_{j,i} @ x_i``, stored under key ``(j, i)``.
"""

from fflayers.shortcuts.early_exit import early_exit
from fflayers.shortcuts.evaluate import evaluate_shortcuts
from fflayers.shortcuts.linear_maps import (
    GramAccumulator,
    apply_map,
    fit_maps,
    load_maps,
    maps_metadata,
    model_id,
    save_maps,
)
from fflayers.shortcuts.positions import Position, positions_frame, positions_from_frame, sample_positions
from fflayers.shortcuts.r2 import r2_scores
from fflayers.shortcuts.states import collect_states, iter_state_batches

__all__ = [
    "GramAccumulator",
    "Position",
    "apply_map",
    "collect_states",
    "early_exit",
    "evaluate_shortcuts",
    "fit_maps",
    "iter_state_batches",
    "load_maps",
    "maps_metadata",
    "model_id",
    "positions_frame",
    "positions_from_frame",
    "r2_scores",
    "sample_positions",
    "save_maps",
]

