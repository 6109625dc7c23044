"""Diagnostics: rank history, basis stability, the rank of the cumulative weight update, and their plots.

- `load_rank_history` / `plot_rank_history`: the `lowrank_history.json` a training run writes beside the model
  (`{"method": ..., "history": [{"step", "event", "ranks": {layer: rank}, "params", "dense_params"}, ...]}`).
- `polar_factor` / `basis_stability`: OIALR's "stability" of a layer's basis between two checks.
- `cumulative_update_rank`: InRank's observation, the smallest k whose top-k singular values of `W_t - W_0`
  hold a fraction τ of its energy.
- `LowRankDiagnosticsCallback` (ranks, stability, spectra) and `CumulativeRankCallback` (any model, dense
  included): `TrainerCallback`s that log scalars through the Trainer's logs and write PNG plots.

Plots use matplotlib's object API on an Agg canvas (no pyplot), so importing this module never changes the
user's matplotlib backend or opens a window.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Optional, Union

import torch
from torch import nn
from transformers import TrainerCallback

from .config import LowRankConfig
from .inject import find_targets
from .layers import LowRankLinear, dense_weight_of, linear_shape, svd_f32
from .methods.svd import energy_rank

HISTORY_NAME = "lowrank_history.json"
DIAGNOSTICS_NAME = "lowrank_diagnostics.json"
RANK_PLOT_NAME = "lowrank_rank_evolution.png"
SPECTRA_PLOT_NAME = "lowrank_singular_values.png"
STABILITY_PLOT_NAME = "lowrank_stability.png"
CUMRANK_PLOT_NAME = "lowrank_cumulative_rank.png"
_LEGEND_MAX = 12  # beyond this many layers a legend hides the plot


# --- rank history ------------------------------------------------------------------------------------

def load_rank_history(source: Union[str, os.PathLike, dict, None]) -> Optional[dict]:
    """The rank history of a training run, or `None` when there is none.

    `source` is a directory holding `lowrank_history.json`, the JSON file itself, or an already loaded dict.
    A bare list of records is accepted too. Raises `ValueError` when the file exists but is not a rank history.
    """
    if source is None:
        return None
    if isinstance(source, (dict, list)):
        data = source
    else:
        path = str(source)
        if os.path.isdir(path):
            path = os.path.join(path, HISTORY_NAME)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON ({err}); delete it or rewrite it from the run.") from None
    if isinstance(data, list):
        data = {"history": data}
    records = data.get("history") if isinstance(data, dict) else None
    if not isinstance(records, list) or not all(
        isinstance(r, dict) and "step" in r and isinstance(r.get("ranks"), dict) for r in records
    ):
        raise ValueError(f"{source!r} is not a rank history: expected {{'history': [{{'step': int, 'ranks': "
                         "{layer: rank}, ...}, ...]}.")
    return data


def _records(history) -> list[dict]:
    records = history.get("history", []) if isinstance(history, dict) else list(history)
    return sorted(records, key=lambda r: r["step"])


def _layers_in_order(records: list[dict], key: str) -> list[str]:
    seen = {}
    for record in records:
        for name in record.get(key, {}):
            seen.setdefault(name, None)
    return list(seen)


def _new_figure(rows: int = 1, height: float = 3.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, axes


def _finish(fig, path: Optional[str]):
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=100)
    return fig


def _line_per_layer(ax, records: list[dict], key: str, layers: list[str], *, step_plot: bool, **style):
    for name in layers:
        points = [(r["step"], r[key][name]) for r in records if name in r.get(key, {})]
        if not points:
            continue
        xs, ys = zip(*points)
        if step_plot:
            ax.step(xs, ys, where="post", marker=".", label=name, **style)
        else:
            ax.plot(xs, ys, marker=".", label=name, **style)
    if 0 < len(layers) <= _LEGEND_MAX:
        ax.legend(fontsize=6, loc="best")


def plot_rank_history(history, path: Optional[str] = None, max_ranks: Optional[dict] = None,
                      title: Optional[str] = None):
    """Plot the rank of every layer over optimizer steps (top) and the totals (bottom): stored parameters of
    the factorized layers over their dense size, and total rank over total full rank when the full ranks are
    known (from `max_ranks`, or from `max_ranks` entries in the records). Saves a PNG when `path` is given;
    returns the matplotlib `Figure`."""
    records = _records(history)
    if not records:
        raise ValueError("The rank history has no records to plot.")
    layers = _layers_in_order(records, "ranks")
    fig, (ax_rank, ax_total) = _new_figure(2)
    _line_per_layer(ax_rank, records, "ranks", layers, step_plot=True, linewidth=1)
    ax_rank.set_ylabel("rank")
    ax_rank.set_title(title or "Rank of each factorized layer")

    steps, param_frac, rank_frac = [], [], []
    for record in records:
        full = {**(max_ranks or {}), **record.get("max_ranks", {})}
        known = [n for n in record["ranks"] if n in full]
        steps.append(record["step"])
        dense = record.get("dense_params")
        param_frac.append(record.get("params", 0) / dense if dense else math.nan)
        held, total = sum(record["ranks"][n] for n in known), sum(full[n] for n in known)
        rank_frac.append(held / total if total else math.nan)
    if not all(math.isnan(v) for v in param_frac):
        ax_total.step(steps, param_frac, where="post", marker=".", label="stored / dense parameters")
    if not all(math.isnan(v) for v in rank_frac):
        ax_total.step(steps, rank_frac, where="post", marker=".", label="total rank / full rank")
    ax_total.set_ylim(0, 1.05)
    ax_total.set_xlabel("optimizer step")
    ax_total.set_ylabel("fraction")
    ax_total.legend(fontsize=7, loc="best")
    return _finish(fig, path)


def plot_layer_ranks(summary, path: Optional[str] = None):
    """Bar chart of each factorized layer's rank as a fraction of its full rank (for a model without a
    training history). `summary` is a `lowrank_summary(model)`."""
    names = list(summary.layers)
    if not names:
        raise ValueError("The model has no factorized layers to plot.")
    fig, (ax,) = _new_figure(1, height=max(2.5, 0.22 * len(names) + 1))
    fractions = [summary.layers[n].rank_fraction for n in names]
    ax.barh(range(len(names)), fractions)
    ax.set_yticks(range(len(names)), [f"{n} ({summary.layers[n].rank}/{summary.layers[n].max_rank})" for n in names],
                  fontsize=6)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("rank / full rank")
    ax.set_title(f"Final ranks (total {summary.rank_fraction:.1%} of full rank)")
    return _finish(fig, path)


def plot_singular_values(spectra: dict, path: Optional[str] = None, title: Optional[str] = None):
    """Plot each layer's singular values, normalized by its largest, on a log scale."""
    fig, (ax,) = _new_figure(1, height=4)
    names = list(spectra)
    for name in names:
        s = torch.as_tensor(spectra[name], dtype=torch.float64)
        if s.numel() == 0 or s[0] <= 0:
            continue
        ax.semilogy(range(1, s.numel() + 1), (s / s[0]).clamp_min(1e-12).tolist(), linewidth=1, label=name)
    if 0 < len(names) <= _LEGEND_MAX:
        ax.legend(fontsize=6, loc="best")
    ax.set_xlabel("index")
    ax.set_ylabel("σᵢ / σ₁")
    ax.set_title(title or "Singular value spectra")
    return _finish(fig, path)


def plot_stability(records, path: Optional[str] = None):
    """Plot the basis stability of every layer (thin) and their mean (thick) over optimizer steps."""
    records = [r for r in _records(records) if r.get("stability")]
    if not records:
        raise ValueError("No stability measurements to plot (it needs at least two checks).")
    fig, (ax,) = _new_figure(1, height=4)
    layers = _layers_in_order(records, "stability")
    _line_per_layer(ax, records, "stability", layers, step_plot=False, linewidth=0.8, alpha=0.6)
    ax.plot([r["step"] for r in records], [r["stability_mean"] for r in records], color="black", linewidth=2.5,
            marker="o", label="mean")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cosine similarity of the polar factor")
    ax.set_title("Basis stability between checks")
    return _finish(fig, path)


# --- measures ----------------------------------------------------------------------------------------

def layer_matrix(module: nn.Module) -> torch.Tensor:
    """A layer's weight as a detached out×in float32 matrix, whether it is dense or factorized."""
    with torch.no_grad():
        matrix = module.dense_matrix() if isinstance(module, LowRankLinear) else dense_weight_of(module)
    return matrix.detach().float()


def layer_rank(module: nn.Module) -> int:
    """Components a layer holds now: its rank if factorized, its full rank `min(in, out)` if dense."""
    return module.rank if isinstance(module, LowRankLinear) else min(linear_shape(module))


def _polar_from_svd(u: torch.Tensor, vh: torch.Tensor, rank: Optional[int]) -> torch.Tensor:
    if rank is not None:
        u, vh = u[:, :rank], vh[:rank]
    b = u @ vh
    # Tall orientation: its columns are the orthonormal side, so every column has a well-defined direction.
    return b.t() if b.shape[0] < b.shape[1] else b


def polar_factor(matrix: torch.Tensor, rank: Optional[int] = None) -> Optional[torch.Tensor]:
    """The orthogonal polar factor `B = U Vᴴ` of `matrix` (from its float32 SVD), oriented tall.

    `B` is invariant to the sign and rotation ambiguity of singular vectors, which makes it comparable across
    checks. With `rank`, only the top `rank` components are used (a factorized layer's weight is rank-deficient).
    Returns `None` (with a warning) when the matrix is not finite or the SVD fails.
    """
    decomposition = svd_f32(matrix)
    if decomposition is None:
        return None
    u, _, vh = decomposition
    return _polar_from_svd(u, vh, rank)


def basis_stability(previous: torch.Tensor, current: torch.Tensor) -> float:
    """OIALR's stability of a basis between two checks: the mean over columns `j` of
    `cos(B_t[:, j], B_prev[:, j])` for the polar factors `B` of the same layer (1.0: the basis did not move)."""
    if previous.shape != current.shape:
        raise ValueError(f"Polar factors of shapes {tuple(previous.shape)} and {tuple(current.shape)} cannot be "
                         "compared: they are not from the same layer.")
    a, b = previous.float(), current.float()
    cos = (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp_min(1e-12)
    return cos.mean().item()


def cumulative_update_rank(delta: torch.Tensor, explained_ratio: float = 0.9) -> Optional[int]:
    """The smallest `k` whose top-k singular values of `delta` hold at least `explained_ratio` of its squared
    Frobenius norm (InRank's rank of the cumulative update `W_t - W_0`). 0 when `delta` is zero; `None` (with a
    warning) when it is not finite."""
    d = delta.detach().float()
    if not torch.isfinite(d).all():
        warnings.warn(f"hf_lowrank: non-finite values in a {tuple(d.shape)} weight update; cumulative rank skipped.")
        return None
    s = torch.linalg.svdvals(d)
    if s.numel() == 0 or s[0] == 0:
        return 0
    return energy_rank(s, explained_ratio)


def resolve_targets(model: nn.Module, targets: Union[str, list, None] = None) -> list[str]:
    """Layer names to watch: `targets` (as `LowRankConfig.target_modules`: "all-linear", suffixes or a regex),
    or, when `None`, the layers the model's own `LowRankConfig` selects (else "all-linear")."""
    config = getattr(model, "lowrank_config", None)
    if targets is not None or config is None:
        config = LowRankConfig(target_modules=targets or "all-linear")
    return find_targets(model, config)


# --- callbacks ---------------------------------------------------------------------------------------

class _DiagnosticsCallback(TrainerCallback):
    """Shared plumbing: a check every `every` optimizer steps on the main process, and logging.

    Scalars go through `trainer.log` when the callback knows the trainer (`trainer=`), which feeds
    `state.log_history` and every `report_to` integration at the step they were measured. Without it they are
    appended to `state.log_history` directly (what `Trainer.log` records) and, when `report_to` includes
    TensorBoard, written to a SummaryWriter of their own (a run named `hf_lowrank` beside the Trainer's).
    Images go to TensorBoard only when a SummaryWriter is available.
    """

    def __init__(self, every: int, trainer=None):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r}: use a whole number of optimizer steps ≥ 1.")
        self.every = every
        self.trainer = trainer
        self.history: list[dict] = []
        self._writer = None
        self._last_step = None

    def _due(self, state) -> bool:
        return (state.is_world_process_zero and state.global_step % self.every == 0
                and state.global_step != self._last_step)

    def _tensorboard(self, args):
        if self.trainer is not None:  # the Trainer's own writer: same run, same event file
            for callback in self.trainer.callback_handler.callbacks:
                if getattr(callback, "tb_writer", None) is not None:
                    return callback.tb_writer
            return None
        if self._writer is None and "tensorboard" in (args.report_to or []):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return None
            log_dir = os.getenv("TENSORBOARD_LOGGING_DIR") or os.path.join(args.output_dir, "runs", "hf_lowrank")
            self._writer = SummaryWriter(log_dir=os.path.expanduser(log_dir))
        return self._writer

    def _log(self, args, state, metrics: dict) -> None:
        if self.trainer is not None:
            self.trainer.log(dict(metrics))
            return
        entry = dict(metrics)
        if state.epoch is not None:
            entry["epoch"] = state.epoch
        state.log_history.append({**entry, "step": state.global_step})
        writer = self._tensorboard(args)
        if writer is not None:
            from transformers.integrations.integration_utils import rewrite_logs

            # the Trainer's TensorBoard names ("train/<key>"), so both routes give the same tags
            for key, value in rewrite_logs(metrics).items():
                writer.add_scalar(key, value, state.global_step)
            writer.flush()

    def _log_figure(self, args, state, tag: str, fig) -> None:
        writer = self._tensorboard(args)
        if writer is None:
            return
        import numpy as np

        fig.canvas.draw()
        image = np.asarray(fig.canvas.buffer_rgba())[..., :3]
        writer.add_image(tag, image, state.global_step, dataformats="HWC")
        writer.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class LowRankDiagnosticsCallback(_DiagnosticsCallback):
    """Every `every` optimizer steps, record per watched layer its rank, its singular values and the OIALR
    basis stability since the previous check; log them and plot them.

    Logged scalars: `rank/<layer>` and `stability/<layer>` (with `per_layer=True`), `rank/fraction` (total
    rank over total full rank of the watched layers) and `stability/mean` (mean over layers, from the second
    check on). At the end of training, PNG plots (`lowrank_rank_evolution.png`, `lowrank_singular_values.png`,
    `lowrank_stability.png`) and the records (`lowrank_diagnostics.json`) are written to `plot_dir` (default:
    `args.output_dir`); the same figures go to TensorBoard as images at every check when a SummaryWriter is
    available.

    Args:
        every: optimizer steps between checks.
        targets: layers to watch (as `LowRankConfig.target_modules`); default the model's own targets.
        per_layer: also log one scalar per layer.
        reference_dtype: dtype of the stored polar factors (`torch.bfloat16` halves the memory on big models).
        plot_dir: where the PNG plots and records go.
        images: send the figures to TensorBoard at every check (when a SummaryWriter is available).
        trainer: the Trainer, so that scalars reach every `report_to` integration (see `_DiagnosticsCallback`).

    Each check costs one float32 SVD per watched layer; keep `every` large on big models.
    """

    def __init__(self, every: int = 100, targets=None, *, per_layer: bool = True,
                 reference_dtype: torch.dtype = torch.float32, plot_dir: Optional[str] = None,
                 images: bool = True, trainer=None):
        super().__init__(every, trainer)
        self.targets_spec = targets
        self.per_layer = per_layer
        self.reference_dtype = reference_dtype
        self.plot_dir = plot_dir
        self.images = images
        self.targets: list[str] = []
        self.spectra: dict[str, list[float]] = {}
        self._reference: dict[str, torch.Tensor] = {}

    def check(self, model: nn.Module, step: int) -> dict:
        """Measure `model` now and append the record to `.history` (also usable without a Trainer)."""
        if not self.targets:
            self.targets = resolve_targets(model, self.targets_spec)
        record = {"step": step, "event": "check", "ranks": {}, "max_ranks": {}, "stability": {}}
        params = dense_params = 0
        for name in self.targets:
            module = model.get_submodule(name)
            rank = layer_rank(module)
            record["ranks"][name] = rank
            record["max_ranks"][name] = min(linear_shape(module))
            held = sum(p.numel() for p in module.parameters())
            params += held
            dense_params += module.dense_params() if isinstance(module, LowRankLinear) else held
            decomposition = svd_f32(layer_matrix(module))
            if decomposition is None:
                continue
            u, s, vh = decomposition
            self.spectra[name] = s[:rank].tolist()
            polar = _polar_from_svd(u, vh, rank)
            previous = self._reference.get(name)
            if previous is not None:
                record["stability"][name] = basis_stability(previous, polar)
            self._reference[name] = polar.to(self.reference_dtype)
        record["params"], record["dense_params"] = params, dense_params
        full = sum(record["max_ranks"].values())
        record["rank_fraction"] = sum(record["ranks"].values()) / full if full else 1.0
        if record["stability"]:
            record["stability_mean"] = sum(record["stability"].values()) / len(record["stability"])
        self.history.append(record)
        self._last_step = step
        return record

    def metrics(self, record: dict) -> dict:
        """The scalars logged for one record."""
        out = {"rank/fraction": record["rank_fraction"]}
        if "stability_mean" in record:
            out["stability/mean"] = record["stability_mean"]
        if self.per_layer:
            out.update({f"rank/{n}": float(r) for n, r in record["ranks"].items()})
            out.update({f"stability/{n}": v for n, v in record["stability"].items()})
        return out

    def save_plots(self, directory: str) -> list[str]:
        """Write the PNG plots (those with data) and the records into `directory`; returns the paths."""
        os.makedirs(directory, exist_ok=True)
        paths = []
        if self.history:
            paths.append(os.path.join(directory, RANK_PLOT_NAME))
            plot_rank_history(self.history, paths[-1])
        if self.spectra:
            paths.append(os.path.join(directory, SPECTRA_PLOT_NAME))
            plot_singular_values(self.spectra, paths[-1])
        if any(r.get("stability") for r in self.history):
            paths.append(os.path.join(directory, STABILITY_PLOT_NAME))
            plot_stability(self.history, paths[-1])
        with open(os.path.join(directory, DIAGNOSTICS_NAME), "w") as f:
            json.dump({"history": self.history, "spectra": self.spectra}, f)
        return paths

    def _check_and_log(self, args, state, model):
        record = self.check(model, state.global_step)
        self._log(args, state, self.metrics(record))
        if self.images and self._tensorboard(args) is not None:
            self._log_figure(args, state, "lowrank/ranks", plot_rank_history(self.history))
            self._log_figure(args, state, "lowrank/singular_values", plot_singular_values(self.spectra))
            if "stability_mean" in record:
                self._log_figure(args, state, "lowrank/stability", plot_stability(self.history))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            self.check(model, state.global_step)  # the reference the first stability is measured against

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and self._due(state):
            self._check_and_log(args, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            if state.global_step != self._last_step:
                self.check(model, state.global_step)
            self.save_plots(self.plot_dir or args.output_dir)
        super().on_train_end(args, state, control, **kwargs)


class CumulativeRankCallback(_DiagnosticsCallback):
    """InRank's central observation, measured on any model (dense included): how many singular directions the
    cumulative weight update `D = W_t - W_0` of each layer needs.

    At the start of training it snapshots each target layer's weight `W_0` (float32, on CPU); every `every`
    optimizer steps it records per layer the smallest `k` whose top-k singular values of `D` hold at least
    `explained_ratio` (τ) of `‖D‖_F²`, and `k / min(in, out)`. Records go to `.history` (`{"step", "ranks",
    "fractions", "mean_fraction"}`) and to the Trainer logs as `cumrank/<layer>` and `cumrank/mean_fraction`.
    At the end of training a plot (`lowrank_cumulative_rank.png`) is written to `plot_dir` if given.

    The snapshot is the weights at `on_train_begin`: when resuming from a checkpoint it is the resumed
    weights, not the run's initialization.
    """

    def __init__(self, every: int = 100, explained_ratio: float = 0.9, targets="all-linear", *,
                 per_layer: bool = True, plot_dir: Optional[str] = None, trainer=None):
        super().__init__(every, trainer)
        if not 0.0 < explained_ratio <= 1.0:
            raise ValueError(f"explained_ratio={explained_ratio} must be in (0, 1].")
        self.explained_ratio = explained_ratio
        self.targets_spec = targets
        self.per_layer = per_layer
        self.plot_dir = plot_dir
        self.initial: dict[str, torch.Tensor] = {}

    def snapshot(self, model: nn.Module) -> None:
        """Store `W_0` of every target layer (call it yourself in a raw training loop)."""
        names = resolve_targets(model, self.targets_spec)
        self.initial = {name: layer_matrix(model.get_submodule(name)).cpu().clone() for name in names}

    def measure(self, model: nn.Module, step: int) -> dict:
        """Record the cumulative-update ranks of `model` now; returns the record."""
        if not self.initial:
            raise RuntimeError("CumulativeRankCallback.measure before snapshot: W_0 was never recorded.")
        record = {"step": step, "ranks": {}, "fractions": {}}
        for name, w0 in self.initial.items():
            current = layer_matrix(model.get_submodule(name)).to(w0.device)
            k = cumulative_update_rank(current - w0, self.explained_ratio)
            if k is None:
                continue
            record["ranks"][name] = k
            record["fractions"][name] = k / min(w0.shape)
        fractions = list(record["fractions"].values())
        record["mean_fraction"] = sum(fractions) / len(fractions) if fractions else math.nan
        self.history.append(record)
        self._last_step = step
        return record

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            self.snapshot(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or not self.initial or not self._due(state):
            return
        record = self.measure(model, state.global_step)
        metrics = {"cumrank/mean_fraction": record["mean_fraction"]}
        if self.per_layer:
            metrics.update({f"cumrank/{n}": float(k) for n, k in record["ranks"].items()})
        self._log(args, state, metrics)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.plot_dir and self.history:
            full = {name: min(w0.shape) for name, w0 in self.initial.items()}
            plot_rank_history(
                [{"step": r["step"], "ranks": r["ranks"], "max_ranks": full} for r in self.history],
                os.path.join(self.plot_dir, CUMRANK_PLOT_NAME),
                title=f"Rank of W_t - W_0 at τ = {self.explained_ratio}")
        super().on_train_end(args, state, control, **kwargs)

