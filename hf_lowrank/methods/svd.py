"""One-shot truncated SVD: compress a (pretrained) model in one call, then train `U`, `V` as usual."""

from __future__ import annotations

from ..layers import dense_weight_of
from ..linalg import energy_rank, factors_from_svd, svd_f32
from .base import LayerChange, Method, register_method


@register_method
class SVDMethod(Method):
    name = "svd"
    title = "one-shot SVD"
    card_description = ("**One-shot SVD**: each layer's weight was truncated to its leading singular components "
                        "(`U Vᵀ`, the singular values folded into both factors), then trained as factors.")

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
            hold = self.dense_hold(name, module, rank, has_sigma=False)
            if hold is not None:  # the truncation would not save anything: keep the exact dense layer
                changes.append(hold)
                continue
            U, _, V = factors_from_svd(u[:, :rank], s[:rank], vh[:rank].t(), has_sigma=False)
            changes.append(LayerChange(name, U, None, V, trainable=("U", "V"), info={"event": "compress"}))
        return changes
