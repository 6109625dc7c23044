"""One-shot truncated SVD: compress a (pretrained) model in one call, then train `U`, `V` as usual."""

from __future__ import annotations

import torch

from ..layers import dense_weight_of, factors_from_svd, svd_f32
from .base import LayerChange, Method


def energy_rank(singular_values: torch.Tensor, threshold: float) -> int:
    """The fewest leading singular values whose squares hold `threshold` of the total."""
    energy = singular_values.double().square()
    total = energy.sum()
    if total <= 0:
        return 1
    cumulative = energy.cumsum(0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(threshold, dtype=cumulative.dtype) - 1e-12).item()) + 1


class SVDMethod(Method):
    name = "svd"

    def describe(self, total_steps):
        return f"svd: layers truncated once, now; {total_steps} optimizer steps of training on the factors.", None

    def initial_changes(self, model, targets):
        changes = []
        for name in targets:
            module = model.get_submodule(name)
            decomposition = svd_f32(dense_weight_of(module))
            if decomposition is None:
                raise ValueError(f"Cannot factorize {name!r}: its weight is not finite or its SVD failed.")
            u, s, vh = decomposition
            default = self.config.rank_fraction
            if self.config.energy_threshold is not None:
                default = energy_rank(s, self.config.energy_threshold)
            rank = self.starting_rank(name, module, default)
            U, _, V = factors_from_svd(u[:, :rank], s[:rank], vh[:rank].t(), has_sigma=False)
            changes.append(LayerChange(name, U, None, V, trainable=("U", "V"), info={"event": "compress"}))
        return changes
