"""`TrainerCallback`s that measure and plot during training: `LowRankDiagnosticsCallback` (ranks, stability,
spectra) and `CumulativeRankCallback` (any model, dense included)."""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch
from torch import nn
from transformers import TrainerCallback

from ..layers import LowRankLinear, linear_shape
from ..linalg import svd_f32
from .measures import (_polar_from_svd, basis_stability, cumulative_update_rank, layer_matrix, layer_rank,
                       resolve_targets)
from .plots import (CUMRANK_PLOT_NAME, RANK_PLOT_NAME, SPECTRA_PLOT_NAME, STABILITY_PLOT_NAME, plot_rank_history,
                    plot_singular_values, plot_stability)

DIAGNOSTICS_NAME = "lowrank_diagnostics.json"


class DiagnosticsCallback(TrainerCallback):
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

    def bind_trainer(self, trainer) -> "DiagnosticsCallback":
        """Log through `trainer.log` from now on (every `report_to` integration, `state.log_history`); returns
        self, so `trainer.add_callback(LowRankDiagnosticsCallback(every=50).bind_trainer(trainer))` works."""
        self.trainer = trainer
        return self

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


class LowRankDiagnosticsCallback(DiagnosticsCallback):
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
        trainer: the Trainer, so that scalars reach every `report_to` integration (see `DiagnosticsCallback`).

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


class CumulativeRankCallback(DiagnosticsCallback):
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
