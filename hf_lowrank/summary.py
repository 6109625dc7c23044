"""`lowrank_summary(model)`: per-layer ranks, parameter counts and the compression they give."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .layers import LowRankLinear
from .layers import DENSE_LAYERS_ATTR


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
                              "dense_params": l.dense_params, "shape": [l.in_features, l.out_features]}
                       for name, l in self.layers.items()},
            "params": self.params, "dense_params": self.dense_params, "compression": self.compression,
            "rank_fraction": self.rank_fraction, "model_params": self.model_params,
            "trainable_params": self.trainable_params, "dense_layers": dict(self.dense_layers),
        }

    def __str__(self) -> str:
        width = max([len("layer")] + [len(n) for n in self.layers])
        lines = [f"{'layer':<{width}}  {'in→out':>11}  {'rank':>9}  {'params':>10}  {'dense':>10}  {'ratio':>6}"]
        for name, l in self.layers.items():
            shape = f"{l.in_features}→{l.out_features}"
            ratio = l.params / l.dense_params if l.dense_params else 0.0
            lines.append(f"{name:<{width}}  {shape:>11}  {f'{l.rank}/{l.max_rank}':>9}  {l.params:>10,}  "
                         f"{l.dense_params:>10,}  {ratio:>6.1%}")
        lines.append(f"{'total':<{width}}  {'':>11}  {self.rank_fraction:>9.1%}  {self.params:>10,}  "
                     f"{self.dense_params:>10,}  {self.compression:>6.1%}")
        for name, reason in self.dense_layers.items():
            lines.append(f"kept dense: {name} ({reason})")
        lines.append(f"model parameters: {self.model_params:,} (trainable {self.trainable_params:,})")
        return "\n".join(lines)


def lowrank_summary(model: nn.Module) -> LowRankSummary:
    """Per-layer ranks and parameter counts of `model`'s factorized layers, keyed by module name."""
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
                out_features=module.out_features, trainable=module.trainable_factors())
    return summary
