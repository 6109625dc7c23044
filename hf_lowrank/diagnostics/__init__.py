"""Diagnostics: measures of a layer's rank, spectrum and basis stability, their plots, and Trainer callbacks.

- `measures`: `layer_matrix`, `layer_rank`, `polar_factor`, `basis_stability` (OIALR's stability of a basis between
  two checks), `cumulative_update_rank` (InRank's observation: the rank of `W_t - W_0`).
- `plots`: `plot_rank_history` (from `lowrank_history.json`), `plot_layer_ranks`, `plot_singular_values`,
  `plot_stability`; matplotlib is imported only when a plot is drawn.
- `callbacks`: `LowRankDiagnosticsCallback` and `CumulativeRankCallback`. Bind one to a Trainer with
  `callback.bind_trainer(trainer)` (or `trainer=` when building it; `LowRankTrainer` binds them itself) so its
  scalars go through `trainer.log` to every `report_to` integration.
"""

from ..history import HISTORY_NAME, load_rank_history
from .callbacks import DIAGNOSTICS_NAME, CumulativeRankCallback, DiagnosticsCallback, LowRankDiagnosticsCallback
from .measures import basis_stability, cumulative_update_rank, layer_matrix, layer_rank, polar_factor, resolve_targets
from .plots import (CUMRANK_PLOT_NAME, RANK_PLOT_NAME, SPECTRA_PLOT_NAME, STABILITY_PLOT_NAME, plot_layer_ranks,
                    plot_rank_history, plot_singular_values, plot_stability)

__all__ = [
    "CUMRANK_PLOT_NAME", "DIAGNOSTICS_NAME", "HISTORY_NAME", "RANK_PLOT_NAME", "SPECTRA_PLOT_NAME",
    "STABILITY_PLOT_NAME", "CumulativeRankCallback", "DiagnosticsCallback", "LowRankDiagnosticsCallback",
    "basis_stability", "cumulative_update_rank", "layer_matrix", "layer_rank", "load_rank_history",
    "plot_layer_ranks", "plot_rank_history", "plot_singular_values", "plot_stability", "polar_factor",
    "resolve_targets",
]
