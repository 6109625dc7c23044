"""InRank (Zhao et al., arXiv:2306.11250): low-rank weights whose rank grows as training needs it.

Each layer holds `r + b` components (`U`: out×(r+b), `V`: in×(r+b), both trained): the rank `r` plus a
buffer `b`. Every `check_every` optimizer steps the rank grows to the number of components that explain
`explained_ratio` (τ) of the energy of the **cumulative update** `D = W_t − W_0`, which is what the paper
observes to grow incrementally. (The reference code measures the spectrum of `W_t` itself, random
initialization included, so its ranks are mostly set by the initialization and τ; see the README.) At
`freeze_step` the rank is fixed and the buffer dropped (best rank-r approximation), in the same run.

Modes: `"efficient"` (the weight itself is `U Vᵀ`, trained from scratch; `W_0` is the starting product) and
`"cumulative"` (`W = W_0 + U Vᵀ` with `W_0` frozen and `U Vᵀ = 0` at start, for fine-tuning).
"""

from __future__ import annotations

import math
import zlib
from typing import Optional

import torch

from ..layers import LowRankLinear, break_even_rank, dense_weight_of
from ..linalg import energy_rank, factors_from_svd, product_spectrum, svd_f32
from ..targets import layer_max_rank
from .base import LayerChange, Method, register_method, resolve_steps


# A cumulative update below this fraction of the weight's norm is rounding noise, not learning.
UNCHANGED = 1e-5


def grow_components(layer: LowRankLinear, extra: int, generator: Optional[torch.Generator] = None):
    """`U`, `V` with `extra` new components that leave `U Vᵀ` unchanged: zero columns in `U`, random ones in
    `V` (scale 1/√in, like LoRA's `A`), so the new components start learning at once."""
    U, V = layer.U.detach().float(), layer.V.detach().float()
    # drawn on the CPU (where the generator lives), then moved: works whatever device the layer is on
    new_v = torch.randn(V.shape[0], extra, generator=generator).to(V.device) / math.sqrt(V.shape[0])
    return torch.cat([U, U.new_zeros(U.shape[0], extra)], 1), torch.cat([V, new_v], 1)


@register_method
class InRankMethod(Method):
    name = "inrank"
    spreads_decisions = True
    title = "InRank"
    card_description = (
        "**InRank** (incremental low-rank learning, Zhao et al., arXiv:2306.11250): each layer (or its cumulative "
        "update) is `U Vᵀ` at a small rank plus a buffer of extra components; at every check the rank grows to what an "
        "explained-variance threshold τ of the update's spectrum asks for, never past the rank at which `U Vᵀ` would "
        "store as much as the dense weight; after a set step the rank is frozen and the buffer dropped.")

    def __init__(self, config):
        super().__init__(config)
        self.ranks: dict[str, int] = {}  # the rank r of each layer; it holds r + buffer components until frozen
        self.frozen = False
        self.start: dict[str, torch.Tensor] = {}  # efficient mode: factors of W_0, for D = W_t − W_0

    # --- schedule ------------------------------------------------------------------------------------
    def _steps(self, total_steps):
        warmup = resolve_steps(self.config.rank_warmup_steps, total_steps, "rank_warmup_steps")
        every = resolve_steps(self.config.check_every, total_steps, "check_every")
        freeze = resolve_steps(self.config.freeze_step, total_steps, "freeze_step")
        return warmup, every, freeze

    def describe(self, total_steps):
        warmup, every, freeze = self._steps(total_steps)
        frozen = f"rank frozen at step {freeze}" if freeze is not None else "rank never frozen"
        text = f"InRank: rank checks from step {warmup} every {every} steps, {frozen} (of {total_steps})."
        warning = None
        if warmup >= total_steps:
            warning = f"InRank never checks its rank in this run: rank_warmup_steps is step {warmup} of {total_steps}."
        return text, warning

    def is_due(self, step, total_steps):
        if self.frozen:
            return False
        warmup, every, freeze = self._steps(total_steps)
        if freeze is not None and step >= freeze:
            return True
        return step >= warmup and (step - warmup) % every == 0

    # --- structure -----------------------------------------------------------------------------------
    def _buffer(self, module) -> int:
        """Buffer components of a layer: `buffer_rank` as a count, or as a fraction of its full rank."""
        buffer = self.config.buffer_rank
        return max(1, round(buffer * layer_max_rank(module))) if isinstance(buffer, float) else buffer

    def _cap(self, module) -> int:
        """Components a layer may hold: `max_rank_fraction` of full rank, and below break-even."""
        n_in, n_out = module.in_features, module.out_features
        return max(1, min(int(self.config.max_rank_fraction * min(n_in, n_out)), break_even_rank(n_in, n_out, False)))

    def initial_changes(self, model, targets):
        changes = []
        for name in targets:
            module = model.get_submodule(name)
            rank = self.starting_rank(name, module, self.config.init_rank)
            buffer = self._buffer(module)
            held = rank + buffer
            full = min(dense_weight_of(module).shape)
            cap = max(1, int(self.config.max_rank_fraction * full))
            if held > cap:
                raise ValueError(
                    f"InRank: init_rank + buffer_rank = {rank} + {buffer} = {held} for {name!r}, "
                    f"above {'its full rank ' + str(full) if held > full else f'max_rank_fraction × full rank = {cap}'}."
                    " Lower buffer_rank/init_rank (the paper's 2 + 100 suits GPT-2-small widths) or target "
                    "wider layers.")
            weight = dense_weight_of(module).detach().float()
            hold = self.dense_hold(name, module, held, has_sigma=False) if self.config.inrank_mode == "efficient" else None
            if hold is not None:  # rank + buffer already at break-even: U Vᵀ would never be smaller than dense
                changes.append(hold)
                continue
            if self.config.inrank_mode == "efficient":
                U, V = self._efficient_start(weight, held)
                info = {"event": "start", "rank": rank}
                changes.append(LayerChange(name, U, None, V, trainable=("U", "V"), info=info))
            else:
                # W = W_0 + U Vᵀ with U = 0: the function is unchanged and D = U Vᵀ from the first step
                V = torch.randn(weight.shape[1], held) / math.sqrt(weight.shape[1])
                U = weight.new_zeros(weight.shape[0], held)
                changes.append(LayerChange(name, U, None, V, trainable=("U", "V"),
                                           info={"event": "start", "rank": rank, "base": True}))
            self.ranks[name] = rank
        return changes

    @staticmethod
    def _efficient_start(weight: torch.Tensor, held: int):
        """Balanced factors of the best rank-`held` approximation of the dense initialization, rescaled to
        its Frobenius norm so activations keep the scale the architecture's init intends."""
        decomposition = svd_f32(weight)
        if decomposition is None:
            raise ValueError("InRank cannot start from a weight that is not finite or whose SVD fails.")
        u, s, vh = decomposition
        s_kept = s[:held]
        scale = (s.square().sum() / s_kept.square().sum().clamp_min(1e-30)).sqrt()
        U, _, V = factors_from_svd(u[:, :held], s_kept * scale, vh[:held].t(), has_sigma=False)
        return U, V

    def begin(self, model, targets):
        targets = [n for n in targets if isinstance(model.get_submodule(n), LowRankLinear)]
        for name in targets:  # a fresh controller (or a reloaded model) learns the ranks from the layers
            layer = model.get_submodule(name)
            self.ranks.setdefault(name, max(1, layer.rank - self._buffer(layer)))
        if self.config.inrank_mode == "efficient" and not self.start and not self.frozen:
            for name in targets:
                layer = model.get_submodule(name)
                self.start[f"{name}.U0"] = layer.U.detach().float().clone()
                self.start[f"{name}.V0"] = layer.V.detach().float().clone()

    # --- decisions -----------------------------------------------------------------------------------
    def cumulative_spectrum(self, name: str, layer: LowRankLinear) -> Optional[torch.Tensor]:
        """Singular values of the layer's cumulative update `D = W_t − W_0`."""
        if self.config.inrank_mode == "cumulative":
            return product_spectrum(layer.U, layer.V)
        U0, V0 = self.start[f"{name}.U0"].to(layer.U.device), self.start[f"{name}.V0"].to(layer.V.device)
        return product_spectrum(torch.cat([layer.U.detach().float(), -U0], 1),
                                torch.cat([layer.V.detach().float(), V0], 1))

    def decide(self, model, targets, step, total_steps):
        _, _, freeze = self._steps(total_steps)
        if freeze is not None and step >= freeze:
            return [c for name in self.ranks
                    if self.decides(name) and (c := self._freeze(name, model.get_submodule(name)))]
        changes = []
        for name in self.ranks:
            if not self.decides(name):
                continue
            layer = model.get_submodule(name)
            spectrum = self.cumulative_spectrum(name, layer)
            if spectrum is None or spectrum.norm() <= UNCHANGED * _weight_norm(layer):
                continue  # nothing learned yet (only rounding noise), or a failed SVD (already warned)
            rank = self.ranks[name]
            needed = energy_rank(spectrum, self.config.explained_ratio)
            new_rank = min(max(rank, needed), self._cap(layer) - self._buffer(layer))
            if new_rank <= rank:
                continue
            # one generator per layer and step: the same numbers whichever process decides the layer
            generator = torch.Generator().manual_seed(zlib.crc32(f"{step}:{name}".encode()))
            U, V = grow_components(layer, new_rank - rank, generator)
            keep = torch.eye(layer.rank, U.shape[1])  # old components keep their state; new ones start at zero
            changes.append(LayerChange(name, U, None, V, trainable=("U", "V"), left=keep, right=keep,
                                       info={"event": "grow", "rank": new_rank}))
        return changes

    def _freeze(self, name: str, layer: LowRankLinear) -> Optional[LayerChange]:
        """Best rank-r approximation of `U Vᵀ` (the buffer dropped), balanced between `U` and `V`."""
        rank = self.ranks[name]
        U, V = layer.U.detach().float(), layer.V.detach().float()
        q_u, r_u = torch.linalg.qr(U)
        q_v, r_v = torch.linalg.qr(V)
        decomposition = svd_f32(r_u @ r_v.t())
        if decomposition is None:
            return None
        p, s, qh = decomposition
        root = s[:rank].sqrt()
        new_U, new_V = q_u @ p[:, :rank] * root, q_v @ qh[:rank].t() * root
        # new_U = U A and new_V = V B within the old spans: m_U' = m_U B, m_V' = m_V A (see LayerChange)
        A = torch.linalg.pinv(r_u) @ p[:, :rank] * root
        B = torch.linalg.pinv(r_v) @ qh[:rank].t() * root
        return LayerChange(name, new_U, None, new_V, trainable=("U", "V"), left=A, right=B,
                           info={"event": "freeze", "rank": rank})

    def commit(self, changes, step):
        for change in changes:
            if change.holds_dense:  # InRank never factorizes it: it trains dense
                self.ranks.pop(change.name, None)
                continue
            self.ranks[change.name] = change.info.get("rank", self.ranks.get(change.name))
            if change.info.get("event") == "freeze":
                self.frozen = True
        if self.frozen:
            self.start.clear()  # W_0 is only needed while the rank can grow

    # --- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self):
        return {"ranks": self.ranks, "frozen": self.frozen}

    def load_state_dict(self, state):
        self.ranks = dict(state["ranks"])
        self.frozen = state["frozen"]

    def tensor_state(self):
        return dict(self.start)

    def load_tensor_state(self, tensors):
        self.start = dict(tensors)


def _weight_norm(layer: LowRankLinear) -> float:
    """‖W‖_F without forming W: ‖U Vᵀ‖_F² = tr((UᵀU)(VᵀV)), r×r products only (plus ‖W0‖ when held)."""
    U, V = layer.U.detach().float(), layer.V.detach().float()
    squared = ((U.t() @ U) * (V.t() @ V)).sum().clamp_min(0)
    if layer.base is not None:  # the update is tiny next to W0: its norm is the scale
        return layer.base.detach().float().norm().item()
    return squared.sqrt().item()
