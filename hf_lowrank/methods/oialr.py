"""OIALR (Coquelin et al., arXiv:2401.08505): train dense, switch to `U Σ Vᵀ` with frozen orthonormal
bases and a trainable dense `Σ`, then every `update_every` steps re-diagonalize `Σ` (rotating the bases)
and cut singular values below `sigma_cutoff` of the largest. Ranks only shrink.
"""

from __future__ import annotations

import math

import torch

from ..layers import LowRankLinear, dense_weight_of, svd_f32
from .base import LayerChange, Method, resolve_steps


def oialr_rank(s: torch.Tensor, rank: int, cutoff: float, max_cut_fraction: float, floor: int) -> int:
    """New rank from descending singular values `s`: keep those ≥ `cutoff`·s₀, but never cut more than
    `max_cut_fraction` of `rank` in one update nor go below `floor` (or above `rank`)."""
    if s.numel() == 0 or s[0] <= 0:
        return rank
    keep = int((s >= cutoff * s[0]).sum().item())
    if keep >= rank:
        return rank
    lowest = max(floor, rank - math.floor(max_cut_fraction * rank))
    return min(rank, max(keep, lowest))


class OIALRMethod(Method):
    name = "oialr"

    def _delay(self, total_steps):
        return resolve_steps(self.config.delay_steps, total_steps, "delay_steps")

    def _every(self, total_steps):
        return resolve_steps(self.config.update_every, total_steps, "update_every")

    def _floor(self, module) -> int:
        full = min(module.in_features, module.out_features) if isinstance(module, LowRankLinear) else None
        if full is None:
            w = dense_weight_of(module)
            full = min(w.shape)
        return min(full, max(self.config.min_rank, int(self.config.min_rank_fraction * full)))

    def converted_targets(self, targets: list[str]) -> list[str]:
        """The targets OIALR factorizes: all of them less the kept first/last layer."""
        first = 1 if self.config.keep_first_layer else 0
        last = len(targets) - (1 if self.config.keep_last_layer else 0)
        return targets[first:last]

    def initial_changes(self, model, targets):
        if self.config.delay_steps == 0:
            return self._convert(model, self.converted_targets(targets))
        return []

    def describe(self, total_steps):
        delay, every = self._delay(total_steps), self._every(total_steps)
        text = (f"OIALR: dense until optimizer step {delay}, then U Σ Vᵀ with a basis update every {every} steps "
                f"(of {total_steps}).")
        warning = None
        if delay >= total_steps:
            warning = (f"OIALR never converts in this run: delay_steps={self.config.delay_steps} is step {delay}, the "
                       f"run has {total_steps} optimizer steps. Pass a fraction of the run instead, e.g. "
                       "--delay_steps 0.3 --update_every 0.1.")
        return text, warning

    def is_due(self, step, total_steps):
        delay, every = self._delay(total_steps), self._every(total_steps)
        return step >= delay and (step - delay) % every == 0

    def decide(self, model, targets, step, total_steps):
        names = self.converted_targets(targets)
        # Layers still dense (the conversion step, or an earlier conversion skipped on a failed SVD) convert
        # now, cut by the same rule; converted layers get their basis update.
        factored = [n for n in names if isinstance(model.get_submodule(n), LowRankLinear)]
        changes = self._convert(model, [n for n in names if n not in factored])
        update_index = (step - self._delay(total_steps)) // self._every(total_steps)
        rolled_out = self._rolled_out(names, update_index)
        changes += [c for n in factored if n in rolled_out and (c := self._rotate_and_cut(n, model.get_submodule(n)))]
        return changes

    def _rolled_out(self, names: list[str], update_index: int) -> list[str]:
        """With progressive rollout, update `index` touches only the last k layers (output side first)."""
        fraction = self.config.progressive_rollout
        if fraction <= 0:
            return names
        k = min(len(names), max(1, math.ceil((update_index + 1) * fraction * len(names))))
        return names[len(names) - k:]

    def _convert(self, model, names: list[str]) -> list[LayerChange]:
        changes = []
        for name in names:
            module = model.get_submodule(name)
            decomposition = svd_f32(dense_weight_of(module))
            if decomposition is None:
                continue  # svd_f32 warned; this layer stays dense and is tried again at the next update
            u, s, vh = decomposition
            start = self.starting_rank(name, module, min(u.shape[0], vh.shape[1]))
            rank = oialr_rank(s[:start], start, self.config.sigma_cutoff, self.config.max_cut_fraction,
                              self._floor(module))
            changes.append(LayerChange(name, u[:, :rank], torch.diag(s[:rank]), vh[:rank].t(), trainable=("S",),
                                       info={"event": "convert", "rank": rank}))
        return changes

    def _rotate_and_cut(self, name: str, layer: LowRankLinear):
        """SVD of Σ (r×r): rotate U, V by its singular vectors (W unchanged) and cut small values."""
        decomposition = svd_f32(layer.S)
        if decomposition is None:
            return None
        us, s, vsh = decomposition
        rank = oialr_rank(s, layer.rank, self.config.sigma_cutoff, self.config.max_cut_fraction, self._floor(layer))
        if rank == layer.rank and not self.config.rotate_without_cut:
            return None  # nothing to cut: keep Σ's coordinates, so the optimizer state stays exact
        P, Q = us[:, :rank], vsh[:rank].t()
        U = layer.U.detach().float() @ P
        V = layer.V.detach().float() @ Q
        return LayerChange(name, U, torch.diag(s[:rank]), V, trainable=("S",), left=P, right=Q,
                           info={"event": "update", "rank": rank})
