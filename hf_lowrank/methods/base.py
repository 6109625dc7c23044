"""What a method hands to surgery, and the interface every method implements.

A method decides *what* changes (new factors and ranks); it never touches an optimizer, an accelerator
or a process group. `surgery.apply_changes` carries the decision out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from ..config import LowRankConfig
from ..inject import layer_max_rank, pattern_lookup, rank_from_spec


@dataclass
class LayerChange:
    """New factors for one layer, and how its optimizer state maps onto them.

    `left` (P, old U-side components × new rank) and `right` (Q, old V-side × new rank) express the
    change of coordinates: a trainable `S` takes the moment `Pᵀ m Q`, a trainable `U` takes `m_U Q`,
    a trainable `V` takes `m_V P`. When the layer was dense, "old components" are its output and input
    dimensions and `m` is the dense weight's moment (out×in); left/right then default to the new `U`/`V`
    (the exact chain rule: `∂L/∂S = Uᵀ G V`, `∂L/∂U = G V`, `∂L/∂V = Gᵀ U`). Columns of P/Q that are zero start with
    zero moments (e.g. newly grown components).
    """

    name: str
    U: torch.Tensor
    S: Optional[torch.Tensor]
    V: torch.Tensor
    trainable: tuple[str, ...]
    left: Optional[torch.Tensor] = None
    right: Optional[torch.Tensor] = None
    info: dict = field(default_factory=dict)  # JSON-able facts for the method's own bookkeeping

    @property
    def rank(self) -> int:
        return self.U.shape[1]


def resolve_steps(value: Union[int, float, None], total_steps: Optional[int], knob: str) -> Optional[int]:
    """An optimizer-step count from a knob given as a count or as a fraction of the run."""
    if value is None or isinstance(value, int):
        return value
    if not total_steps:
        raise ValueError(f"{knob}={value} is a fraction of the run, but the total number of optimizer steps is "
                         "unknown: pass num_training_steps to LowRankController (the Trainer does it for you).")
    return max(1, math.ceil(value * total_steps))


class Method:
    """Interface of a rank method. Schedules count optimizer steps; `step` is the number of optimizer
    steps taken so far (1 after the first `optimizer.step()`)."""

    name = "base"

    def __init__(self, config: LowRankConfig):
        self.config = config

    def starting_rank(self, name: str, module: nn.Module, default) -> int:
        """`rank_pattern` override for this layer, else `default` (an int rank or a float fraction)."""
        spec = pattern_lookup(self.config.rank_pattern, name)
        return rank_from_spec(default if spec is None else spec, layer_max_rank(module), name)

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
        """The changes due at `step` (runs on process 0 only)."""
        return []

    def commit(self, changes: list[LayerChange], step: int) -> None:
        """Update the method's own bookkeeping after `changes` were applied (runs on every process)."""

    def state_dict(self) -> dict:
        """JSON-serializable state for checkpoints."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def tensor_state(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint beside `state_dict` (saved as safetensors)."""
        return {}

    def load_tensor_state(self, tensors: dict[str, torch.Tensor]) -> None:
        pass
