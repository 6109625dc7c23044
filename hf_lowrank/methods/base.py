"""What a method hands to surgery, and the interface every method implements.

A method decides *what* changes (new factors and ranks); it never touches an optimizer, an accelerator
or a process group. `surgery.apply_changes` carries the decision out.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from ..config import LowRankConfig
from ..layers import break_even_rank, linear_shape
from ..registry import register_method
from ..targets import layer_max_rank, pattern_lookup, rank_from_spec

__all__ = ["LayerChange", "Method", "register_method", "resolve_steps"]


@dataclass
class LayerChange:
    """New factors for one layer, and how its optimizer state maps onto them.

    `left` (P, old U-side components × new rank) and `right` (Q, old V-side × new rank) express the
    change of coordinates: a trainable `S` takes the moment `Pᵀ m Q`, a trainable `U` takes `m_U Q`,
    a trainable `V` takes `m_V P`. When the layer was dense, "old components" are its output and input
    dimensions and `m` is the dense weight's moment (out×in); left/right then default to the new `U`/`V`
    (the exact chain rule: `∂L/∂S = Uᵀ G V`, `∂L/∂U = G V`, `∂L/∂V = Gᵀ U`). Columns of P/Q that are zero start with
    zero moments (e.g. newly grown components).

    A change with `U = V = None` holds a dense layer dense: its rank `info["rank"]` is at or above break-even
    (a factorization would store and compute more than the dense layer), `info["reason"]` says so.
    """

    name: str
    U: Optional[torch.Tensor]
    S: Optional[torch.Tensor]
    V: Optional[torch.Tensor]
    trainable: tuple[str, ...] = ()
    left: Optional[torch.Tensor] = None
    right: Optional[torch.Tensor] = None
    info: dict = field(default_factory=dict)  # JSON-able facts for the method's own bookkeeping

    @property
    def holds_dense(self) -> bool:
        return self.U is None

    @property
    def rank(self) -> int:
        return self.info["rank"] if self.U is None else self.U.shape[1]


def resolve_steps(value: Union[int, float, None], total_steps: Optional[int], knob: str) -> Optional[int]:
    """An optimizer-step count from a knob given as a count or as a fraction of the run."""
    if value is None or isinstance(value, int):
        return value
    if not total_steps:
        raise ValueError(f"{knob}={value} is a fraction of the run, but the total number of optimizer steps is "
                         "unknown: pass num_training_steps to LowRankController (the Trainer does it for you), or "
                         "give the knob as a step count.")
    return max(1, math.ceil(value * total_steps))


class Method:
    """Interface of a rank method. Schedules count optimizer steps; `step` is the number of optimizer
    steps taken so far (1 after the first `optimizer.step()`).

    Subclass it, set `name` (and `title`, `card_description` for model cards), implement the hooks below, and
    decorate the class with `hf_lowrank.register_method`. Options of a third-party method come from
    `LowRankConfig(method=name, method_options={...})`: declare them as a dataclass in `options_class` and read
    them from `self.options`.

    The hooks, in the order a run calls them:
        initial_changes: in `get_lowrank_model`, before training.
        begin: once when training starts.
        is_due: after every optimizer step (identical on every process).
        decide: when due; returns `LayerChange`s. A method with `spreads_decisions = True` runs it on every
            process and computes only the layers `self.decides(name)` accepts (the process's share); otherwise
            it runs on process 0 for every layer.
        commit: on every process, after the changes were applied.
        state_dict / load_state_dict, tensor_state / load_tensor_state: checkpoints (JSON and tensors).
    """

    name = "base"
    title = "base"  # a short display name, e.g. "OIALR"
    card_description = ""  # one paragraph for model cards (Markdown)
    options_class: Optional[type] = None  # a dataclass of the method's own options (third-party methods)
    # True when `decide` reads and decides only the layers `decides(name)` accepts, so the processes can share
    # the work (a decision that looks at several layers still sees the full target list).
    spreads_decisions = False
    share: Optional[frozenset] = None  # this process's layers while `decide` runs; None: every layer

    def __init__(self, config: LowRankConfig):
        self.config = config
        self.options = self.options_class(**config.method_options) if self.options_class is not None else None

    @classmethod
    def check_options(cls, options: dict) -> None:
        """Validate `LowRankConfig.method_options` for this method (raises `ValueError` naming the problem)."""
        if cls.options_class is None:
            if options:
                raise ValueError(f"method {cls.name!r} takes no method_options (got {sorted(options)}); its knobs are "
                                 "LowRankConfig fields.")
            return
        known = {f.name for f in dataclasses.fields(cls.options_class)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"method_options {unknown} are not options of method {cls.name!r}; it takes "
                             f"{sorted(known)}.")
        cls.options_class(**options)  # the options dataclass's own checks (__post_init__)

    # --- shared helpers ------------------------------------------------------------------------------
    def decides(self, name: str) -> bool:
        """Whether this process computes layer `name`'s decision (see `spreads_decisions`)."""
        return self.share is None or name in self.share

    def starting_rank(self, name: str, module: nn.Module, default) -> int:
        """`rank_pattern` override for this layer, else `default` (an int rank or a float fraction)."""
        spec = pattern_lookup(self.config.rank_pattern, name)
        return rank_from_spec(default if spec is None else spec, layer_max_rank(module), name)

    @staticmethod
    def dense_hold(name: str, module: nn.Module, rank: int, *, has_sigma: bool,
                   info: Optional[dict[str, Any]] = None) -> Optional[LayerChange]:
        """A change holding a dense layer dense when `rank` is at or above break-even (a factorization would
        store and compute more than the dense layer); None when factorizing at `rank` pays."""
        n_in, n_out = linear_shape(module)
        limit = break_even_rank(n_in, n_out, has_sigma)
        if rank <= limit:
            return None
        stored = rank * (n_in + n_out) + (rank * rank if has_sigma else 0)
        reason = (f"rank {rank}/{min(n_in, n_out)} would store {stored / (n_in * n_out):.0%} of the dense weight "
                  f"(factorized only at rank ≤ {limit})")
        return LayerChange(name, None, None, None, info={"event": "dense", "rank": rank, "reason": reason,
                                                          **(info or {})})

    # --- hooks ---------------------------------------------------------------------------------------
    def initial_changes(self, model: nn.Module, targets: list[str]) -> list[LayerChange]:
        """Changes to make in `get_lowrank_model`, before any training."""
        return []

    def begin(self, model: nn.Module, targets: list[str]) -> None:
        """Called once when training starts (after the accelerator synchronized the weights)."""

    def describe(self, total_steps: int) -> tuple[str, Optional[str]]:
        """A one-line account of the schedule over a run of `total_steps` optimizer steps, and a warning
        (or None) when the run is too short for it."""
        return f"{self.name}: {total_steps} optimizer steps.", None

    def is_due(self, step: int, total_steps: Optional[int]) -> bool:
        """Whether `decide` has anything to do at this step; identical on every process."""
        return False

    def decide(self, model: nn.Module, targets: list[str], step: int, total_steps: Optional[int]) -> list[LayerChange]:
        """The changes due at `step`, for the layers `self.decides(name)` accepts."""
        return []

    def commit(self, changes: list[LayerChange], step: int) -> None:
        """Update the method's own bookkeeping after `changes` were applied (runs on every process)."""

    def state_dict(self) -> dict:
        """JSON-serializable state for checkpoints."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""

    def tensor_state(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint beside `state_dict` (saved as safetensors)."""
        return {}

    def load_tensor_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what `tensor_state` returned."""
