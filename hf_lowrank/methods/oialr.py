"""OIALR (Coquelin et al., arXiv:2401.08505): train dense, switch to `U Σ Vᵀ` with frozen orthonormal
bases and a trainable dense `Σ`, then every `update_every` steps re-diagonalize `Σ` (rotating the bases)
and cut singular values below `sigma_cutoff` of the largest. Ranks only shrink.
"""

from __future__ import annotations

import math

import torch

from ..layers import LowRankLinear, dense_weight_of
from ..targets import layer_max_rank
from ..linalg import svd_f32
from .base import LayerChange, Method, register_method, resolve_steps


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


@register_method
class OIALRMethod(Method):
    name = "oialr"
    title = "OIALR"
    spreads_decisions = True
    card_description = (
        "**OIALR** (orthogonality-informed adaptive low-rank training, Coquelin et al., arXiv:2401.08505): the layers "
        "train at full rank for a warm-up, are then converted to `U Σ Vᵀ` with frozen orthogonal bases `U`, `V` and a "
        "small trainable `Σ`; every few optimizer steps `Σ` is re-diagonalized, the bases rotated, and singular values "
        "below a fraction of the largest cut, so the rank only shrinks. A layer whose rank is still above break-even "
        "(where `U Σ Vᵀ` would store more than the dense weight) stays dense until an update brings it below.")

    def __init__(self, config):
        super().__init__(config)
        # Ranks of layers held dense because their rank is above break-even; the rule continues from them.
        self.dense_ranks: dict[str, int] = {}

    def _delay(self, total_steps):
        return resolve_steps(self.config.delay_steps, total_steps, "delay_steps")

    def _every(self, total_steps):
        return resolve_steps(self.config.update_every, total_steps, "update_every")

    def _floor(self, module) -> int:
        full = layer_max_rank(module)
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
        factored = [n for n in names if _has_sigma(model.get_submodule(n))]
        changes = self._convert(model, [n for n in names if self.decides(n)
                                        and not isinstance(model.get_submodule(n), LowRankLinear)])
        update_index = (step - self._delay(total_steps)) // self._every(total_steps)
        rolled_out = self._rolled_out(names, update_index)  # from the full list: it picks layers by position
        changes += [c for n in factored if n in rolled_out and self.decides(n)
                    and (c := self._rotate_and_cut(n, model.get_submodule(n)))]
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
            # A layer held dense continues from the rank the rule gave it last time.
            start = self.dense_ranks.get(name) or self.starting_rank(name, module, min(u.shape[0], vh.shape[1]))
            rank = oialr_rank(s[:start], start, self.config.sigma_cutoff, self.config.max_cut_fraction,
                              self._floor(module))
            hold = self.dense_hold(name, module, rank, has_sigma=True)
            if hold is not None:
                changes.append(hold)
                continue
            changes.append(LayerChange(name, u[:, :rank], torch.diag(s[:rank]), vh[:rank].t(), trainable=("S",),
                                       info={"event": "convert", "rank": rank}))
        return changes

    def commit(self, changes, step):
        for change in changes:
            if change.holds_dense:
                self.dense_ranks[change.name] = change.rank
            else:
                self.dense_ranks.pop(change.name, None)

    def state_dict(self):
        return {"dense_ranks": self.dense_ranks}

    def load_state_dict(self, state):
        self.dense_ranks = dict(state.get("dense_ranks", {}))

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


def _has_sigma(module) -> bool:
    """A layer in OIALR's training form (a use-form export folded `Σ` away: nothing left to rotate)."""
    return isinstance(module, LowRankLinear) and module.S is not None
