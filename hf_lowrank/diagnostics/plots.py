"""Plots of ranks, spectra and stability: matplotlib's object API on an Agg canvas (no pyplot), so drawing never
changes the user's matplotlib backend or opens a window. matplotlib is imported only when a figure is made."""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

RANK_PLOT_NAME = "lowrank_rank_evolution.png"
SPECTRA_PLOT_NAME = "lowrank_singular_values.png"
STABILITY_PLOT_NAME = "lowrank_stability.png"
CUMRANK_PLOT_NAME = "lowrank_cumulative_rank.png"
_LEGEND_MAX = 12  # beyond this many layers a legend hides the plot


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
