"""`lowrank_summary(model)`: per-layer ranks, parameter counts and the compression they give; and the
approximation error a factorization makes on the weights it started from."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .layers import DENSE_LAYERS_ATTR, LowRankLinear, dense_weight_of
from .methods.base import LayerChange
from .serialization import APPROXIMATION_ERRORS_ATTR

# Relative errors below this are float32 rounding of an exact factorization (full-rank SVD, W0 + 0·Vᵀ).
EXACT_TOLERANCE = 1e-5
# Above this, factorizing weights loaded from a checkpoint changes the model's function enough to warn.
WARN_THRESHOLD = 1e-3


@dataclass
class LayerSummary:
    """One factorized layer: `rank` components held now, `max_rank = min(in, out)`, `params` stored
    (factors, `S` if any, bias) and `dense_params` of the same layer dense (bias included)."""

    rank: int
    max_rank: int
    params: int
    dense_params: int
    in_features: int
    out_features: int
    trainable: list
    # ‖W − W'‖_F / ‖W‖_F of the factorization from the starting weights; None where it was exact
    approximation_error: Optional[float] = None

    @property
    def rank_fraction(self) -> float:
        return self.rank / self.max_rank if self.max_rank else 0.0


@dataclass
class LowRankSummary:
    """Summary over the factorized layers; `str()` is a readable table."""

    layers: dict = field(default_factory=dict)
    model_params: int = 0
    trainable_params: int = 0
    # target layers kept dense because a factorization would store and compute more: name -> reason
    dense_layers: dict = field(default_factory=dict)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers.values())

    @property
    def dense_params(self) -> int:
        return sum(layer.dense_params for layer in self.layers.values())

    @property
    def compression(self) -> float:
        """Stored parameters of the factorized layers as a fraction of their dense size."""
        return self.params / self.dense_params if self.dense_params else 1.0

    @property
    def rank_fraction(self) -> float:
        """Total rank held over total full rank of the factorized layers."""
        full = sum(layer.max_rank for layer in self.layers.values())
        return sum(layer.rank for layer in self.layers.values()) / full if full else 1.0

    def to_dict(self) -> dict:
        return {
            "layers": {name: {"rank": l.rank, "max_rank": l.max_rank, "params": l.params,
                              "dense_params": l.dense_params, "shape": [l.in_features, l.out_features],
                              "approximation_error": l.approximation_error}
                       for name, l in self.layers.items()},
            "params": self.params, "dense_params": self.dense_params, "compression": self.compression,
            "rank_fraction": self.rank_fraction, "model_params": self.model_params,
            "trainable_params": self.trainable_params, "dense_layers": dict(self.dense_layers),
        }

    def __str__(self) -> str:
        width = max([len("layer")] + [len(n) for n in self.layers])
        errors = any(l.approximation_error is not None for l in self.layers.values())
        lines = [f"{'layer':<{width}}  {'in→out':>11}  {'rank':>9}  {'params':>10}  {'dense':>10}  {'ratio':>6}"
                 + ("  approx. error" if errors else "")]
        for name, l in self.layers.items():
            shape = f"{l.in_features}→{l.out_features}"
            ratio = l.params / l.dense_params if l.dense_params else 0.0
            error = "" if not errors else f"  {format_error(l.approximation_error):>13}"
            lines.append(f"{name:<{width}}  {shape:>11}  {f'{l.rank}/{l.max_rank}':>9}  {l.params:>10,}  "
                         f"{l.dense_params:>10,}  {ratio:>6.1%}{error}")
        lines.append(f"{'total':<{width}}  {'':>11}  {self.rank_fraction:>9.1%}  {self.params:>10,}  "
                     f"{self.dense_params:>10,}  {self.compression:>6.1%}")
        for name, reason in self.dense_layers.items():
            lines.append(f"kept dense: {name} ({reason})")
        lines.append(f"model parameters: {self.model_params:,} (trainable {self.trainable_params:,})")
        if errors:
            lines.append("approx. error: ‖W − W'‖/‖W‖ of the factorization from the starting weights (– = exact)")
        return "\n".join(lines)


def format_error(error: Optional[float]) -> str:
    """A relative approximation error for tables: `2.31%`, `0.0042%`, or `–` when exact (None)."""
    if error is None:
        return "–"
    return f"{error:.2%}" if error >= 1e-3 else f"{error:.2g}"


def lowrank_summary(model: nn.Module) -> LowRankSummary:
    """Per-layer ranks and parameter counts of `model`'s factorized layers, keyed by module name."""
    errors = getattr(model, APPROXIMATION_ERRORS_ATTR, None) or {}
    summary = LowRankSummary(
        model_params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        dense_layers={name: held["reason"] for name, held in (getattr(model, DENSE_LAYERS_ATTR, None) or {}).items()},
    )
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            summary.layers[name] = LayerSummary(
                rank=module.rank, max_rank=module.max_rank, params=module.stored_params(),
                dense_params=module.dense_params(), in_features=module.in_features,
                out_features=module.out_features, trainable=module.trainable_factors(),
                approximation_error=errors.get(name))
    return summary


def record_approximation_errors(model: nn.Module, changes: list[LayerChange]) -> dict[str, float]:
    """Measure what `changes` (about to replace dense layers) do to each layer's own weight, store the
    errors on the model (`lowrank_summary`, config.json and the model card report them), and warn when
    weights loaded from a checkpoint change by more than `WARN_THRESHOLD`.

    The error of a layer is `‖W − W'‖_F / ‖W‖_F`, `W` its dense weight and `W'` what the factors represent
    (`U S Vᵀ`, plus `W` itself for a layer that keeps it as a frozen base). Call it before surgery replaces
    the dense layers. Returns the errors above `EXACT_TOLERANCE` (the factorizations that are not exact).

    Args:
        model: the model, its target layers still dense.
        changes: the method's `initial_changes` for it.
    """
    errors = {}
    with torch.no_grad():
        for change in changes:
            module = model.get_submodule(change.name)
            if change.holds_dense or isinstance(module, LowRankLinear):
                continue
            weight = dense_weight_of(module).detach().float()
            product = change.U.float() @ (change.V.float().t() if change.S is None
                                          else change.S.float() @ change.V.float().t())
            difference = product if change.info.get("base") else weight - product.to(weight.device)
            norm = weight.norm()
            error = float(difference.norm() / norm) if norm > 0 else 0.0
            if error > EXACT_TOLERANCE:
                errors[change.name] = error
    setattr(model, APPROXIMATION_ERRORS_ATTR, errors)
    # Only weights loaded from a checkpoint (transformers flags them): a fresh random initialization, e.g. InRank
    # pretraining from scratch, has no function worth keeping and would only make the warning noise.
    loaded = {name: e for name, e in errors.items() if e > WARN_THRESHOLD
              and getattr(model.get_submodule(name).weight, "_is_hf_initialized", False)}
    if loaded:
        warnings.warn(_function_change_message(loaded, getattr(model, "lowrank_config", None)), stacklevel=3)
    return errors


def _function_change_message(errors: dict[str, float], config) -> str:
    worst = sorted(errors.items(), key=lambda item: -item[1])
    shown = ", ".join(f"{name} {format_error(e)}" for name, e in worst[:5])
    more = f" and {len(worst) - 5} more" if len(worst) > 5 else ""
    method = getattr(config, "method", None)
    if method == "inrank" and getattr(config, "inrank_mode", None) == "efficient":
        fix = ('inrank_mode="efficient" replaces each weight by a low-rank approximation; use '
               'inrank_mode="cumulative" (W = W0 + U Vᵀ, U = 0 at the start) to fine-tune from exactly the '
               "pretrained function.")
    elif method == "svd":
        fix = (f"Keep more of each weight: a higher rank_fraction (now {config.rank_fraction}), an energy_threshold "
               "closer to 1, or larger ranks for these layers in rank_pattern.")
    else:
        fix = "Larger starting ranks for these layers (rank_pattern) keep more of the function."
    return (f"hf_lowrank: factorizing changed {len(worst)} layer(s) loaded from a checkpoint by more than "
            f"{WARN_THRESHOLD:.1%} of their weight (relative error ‖W − W'‖/‖W‖): {shown}{more}. The model no longer "
            f"computes what it computed before. {fix} lowrank_summary(model) lists every layer's error.")
