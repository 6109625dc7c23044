"""`LowRankController`: drives a method's schedule from a training loop.

One call after each `optimizer.step()` performs any due rank change (each process decides a share of the
layers, the decisions are shared, surgery applies them everywhere with the optimizer state carried over) and
says whether the model's parameters changed; `reprepare` then re-wraps the model for the accelerator.
`LowRankTrainer` is a thin user of it.

A raw `accelerate` loop::

    model = get_lowrank_model(model, LowRankConfig(method="oialr", delay_steps=500, update_every=100))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    controller = LowRankController(model, optimizer=optimizer, accelerator=accelerator,
                                   dataloader=loader, epochs=num_epochs)  # counts the optimizer steps itself
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            optimizer.step(); scheduler.step(); optimizer.zero_grad()
        if controller.step():
            model = controller.reprepare(model)
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from typing import Optional

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from .config import LowRankConfig
from .history import save_rank_history
from .layers import LowRankLinear
from .methods import LayerChange, get_method
from .serialization import (STRUCTURE_NAME, LowRankQuantizationConfig, restructure_like_checkpoint,
                            sync_quantization_config)
from .summary import lowrank_summary
from .sharding import assign_owners, check_sharded_training, gathered, world
from .surgery import apply_changes, is_distributed, reprepare, share_changes
from .targets import find_targets

STATE_NAME = "lowrank_state.json"
TENSORS_NAME = "lowrank_state.safetensors"

# One line per rank change, under the package's own logger (`logging.getLogger("hf_lowrank")` silences it).
logger = hf_logging.get_logger("hf_lowrank")


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / accelerate wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


class LowRankController:
    """Runs the low-rank schedule of `model` (prepared with `get_lowrank_model`).

    Args:
        model: the model (a DDP-wrapped model is unwrapped).
        config: defaults to `model.lowrank_config`.
        optimizer: the optimizer training `model` (torch or accelerate-wrapped); its parameter groups and
            state are updated in place at every rank change, so LR schedulers stay valid.
        accelerator: an `accelerate.Accelerator`, for re-preparing after changes and for skipping
            gradient-accumulation micro-steps.
        num_training_steps: total optimizer steps, needed when schedule knobs are given as fractions. When
            `dataloader` is given too and the two disagree, this count is kept and a warning says by how much.
        dataloader: the training loader **as returned by `accelerator.prepare`**; with `epochs` and the
            accelerator's gradient accumulation it gives the true number of optimizer steps (used when
            `num_training_steps` is not given).
        epochs: passes over `dataloader` (default 1).
    """

    def __init__(self, model: nn.Module, config: Optional[LowRankConfig] = None, optimizer=None,
                 accelerator=None, num_training_steps: Optional[int] = None, dataloader=None,
                 epochs: Optional[float] = None):
        self.model = unwrap(model)
        self.config = config or getattr(self.model, "lowrank_config", None)
        if self.config is None:
            raise ValueError("The model has no LowRankConfig: call hf_lowrank.get_lowrank_model(model, config) "
                             "first, or pass config=.")
        _check_accelerator(accelerator)
        self.method = get_method(self.config)
        self.targets = find_targets(self.model, self.config)
        self.optimizer = optimizer
        self.accelerator = accelerator
        self.num_training_steps = self._resolve_training_steps(num_training_steps, dataloader, epochs)
        self.global_step = 0
        self.history: list[dict] = []
        self.started = False
        # wall-clock spent in rank updates (decision, broadcast, surgery) and re-prepares, for benchmarks
        self.update_seconds = 0.0

    # --- the run's length -----------------------------------------------------------------------------
    def optimizer_steps(self, dataloader, epochs: Optional[float] = None) -> Optional[int]:
        """Optimizer steps that `epochs` passes over `dataloader` take (None when it has no length).

        With gradient accumulation `k`, accelerate steps the optimizer every `k` batches and at the end of each
        pass (`sync_with_dataloader`), so a pass of `n` batches takes `ceil(n / k)` steps.

        Args:
            dataloader: the loader returned by `accelerator.prepare` (its length is this process's batches).
            epochs: passes over it (default 1); a fraction counts the batches of a partial pass.
        """
        try:
            batches = len(dataloader)
        except TypeError:  # an iterable dataset: no length to count from
            return None
        epochs = 1 if epochs is None else epochs
        accumulation, per_pass = 1, True
        if self.accelerator is not None:
            accumulation = max(1, int(self.accelerator.gradient_accumulation_steps))
            per_pass = self.accelerator.gradient_state.sync_with_dataloader
        if per_pass:
            full, partial = divmod(epochs, 1)
            return int(full) * math.ceil(batches / accumulation) + math.ceil(int(partial * batches) / accumulation)
        return int(epochs * batches) // accumulation

    def _resolve_training_steps(self, given: Optional[int], dataloader, epochs) -> Optional[int]:
        """The run's optimizer steps: `given`, else counted from the loader; warn when the two disagree."""
        if dataloader is None:
            return given
        if (self.accelerator is not None and self.accelerator.num_processes > 1
                and not getattr(dataloader, "_is_accelerate_prepared", False)):
            warnings.warn("hf_lowrank: the dataloader given to LowRankController was not prepared by the accelerator:"
                          f" its length counts the batches of all {self.accelerator.num_processes} processes, not "
                          "this one's. Pass the loader returned by accelerator.prepare(...).")
        counted = self.optimizer_steps(dataloader, epochs)
        if given is None or counted is None:
            return given if given is not None else counted
        if given != counted:
            accumulation = self.accelerator.gradient_accumulation_steps if self.accelerator is not None else 1
            warnings.warn(
                f"hf_lowrank: num_training_steps={given}, but the dataloader gives {counted} optimizer steps "
                f"({len(dataloader)} batches per pass on this process, gradient accumulation {accumulation}, "
                f"{1 if epochs is None else epochs} epoch(s)). Schedule knobs given as fractions of the run are "
                f"resolved against {given} steps, {given / counted:.2f}x the loop's length"
                f"{' (changes scheduled past its end never happen)' if given > counted else ''}. Count the steps "
                "after accelerator.prepare (ceil(len(loader) / gradient_accumulation_steps) per epoch), or drop "
                "num_training_steps and pass dataloader= and epochs=.")
        return given

    # --- the training-loop calls ----------------------------------------------------------------------
    def begin(self) -> None:
        """Start of training (the first `step` calls it): lets the method take its snapshots and records
        the starting ranks. Safe to call more than once."""
        if self.started:
            return
        self.started = True
        with gathered(self.model, self.targets):  # FSDP2: snapshots need the full weights
            self.method.begin(self.model, self.targets)
        if not self.history:
            self._record(self.global_step, "start")

    def step(self) -> bool:
        """Call after every `optimizer.step()`. Returns True when parameters were replaced or changed
        shape (then call `reprepare`). Micro-steps of gradient accumulation are ignored."""
        if self.accelerator is not None and not self.accelerator.sync_gradients:
            return False
        if getattr(self.optimizer, "step_was_skipped", False):
            return False
        return self.step_to(self.global_step + 1)

    def step_to(self, global_step: int) -> bool:
        """Like `step`, with the optimizer-step count given (the Trainer's `state.global_step`)."""
        self.begin()
        self.global_step = global_step
        if not self.method.is_due(global_step, self.num_training_steps):
            return False
        start = time.perf_counter()
        changes = self.decide_changes(global_step)
        changed = apply_changes(self.model, changes, self.optimizer)
        if changes:
            sync_quantization_config(self.model)  # every checkpoint from now on records the new ranks
        self.method.commit(changes, global_step)
        events = sorted({c.info.get("event", "update") for c in changes if not c.holds_dense})
        if events:
            self._record(global_step, "+".join(events))
        self.update_seconds += time.perf_counter() - start
        return changed

    def decide_changes(self, global_step: int, spread: bool = True) -> list[LayerChange]:
        """The changes due at `global_step`, the same list on every process, in target order.

        With several processes and a method that `spreads_decisions`, each process decides its share of the
        layers (`sharding.assign_owners`: each layer once, balanced by cost) and the results are shared;
        otherwise (or with `spread=False`) process 0 decides every layer. Under FSDP2 each layer's full weights
        are gathered for the decision. Collective: every process must call it. Does not change any state.
        """
        rank, size = world()
        spread = spread and size > 1 and self.method.spreads_decisions
        owners = assign_owners(self.model, self.targets, size) if spread else dict.fromkeys(self.targets, 0)
        mine = frozenset(name for name, owner in owners.items() if owner == rank)
        local = []
        with gathered(self.model, self.targets, keep=mine):
            if spread or rank == 0:
                self.method.share = mine if spread else None
                try:
                    local = self.method.decide(self.model, self.targets, global_step, self.num_training_steps)
                finally:
                    self.method.share = None
        # a layer is applied once, from its owner, even if a method computed more than its share
        local = [c for c in local if owners.get(c.name, 0) == rank]
        changes = share_changes(local, next(self.model.parameters()).device)
        order = {name: i for i, name in enumerate(self.targets)}
        return sorted(changes, key=lambda c: order.get(c.name, len(order)))

    def reprepare(self, wrapped_model: nn.Module) -> nn.Module:
        """Re-wrap the model for the accelerator after `step` returned True (no-op on one process)."""
        if self.accelerator is None:
            return wrapped_model
        start = time.perf_counter()
        wrapped_model = reprepare(self.accelerator, wrapped_model)
        self.update_seconds += time.perf_counter() - start
        return wrapped_model

    # --- reporting ------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Compression figures for training logs."""
        summary = lowrank_summary(self.model)
        held, fraction = self._held_params(summary)
        return {
            "lowrank/rank_fraction": summary.rank_fraction if summary.layers else 1.0,
            "lowrank/trainable_params": float(summary.trainable_params),
            "lowrank/factorized_layer_params": float(held),
            "lowrank/param_fraction": fraction,
        }

    def _held_params(self, summary) -> tuple[int, float]:
        """Parameters the target layers hold now (factorized or still dense), and their fraction of dense."""
        dense_targets = sum(self._dense_size(name) for name in self.targets)
        held = summary.params + sum(self._dense_size(n) for n in self.targets
                                    if not isinstance(self.model.get_submodule(n), LowRankLinear))
        return held, held / dense_targets if dense_targets else 1.0

    def _dense_size(self, name: str) -> int:
        module = self.model.get_submodule(name)
        if isinstance(module, LowRankLinear):
            return module.dense_params()
        return sum(p.numel() for p in module.parameters(recurse=False))

    def _record(self, step: int, event: str) -> None:
        summary = lowrank_summary(self.model)
        self.history.append({
            "step": step, "event": event,
            "ranks": {name: layer.rank for name, layer in summary.layers.items()},
            "params": summary.params, "dense_params": summary.dense_params,
            "trainable_params": summary.trainable_params,
        })
        if event != "start" and _is_main_process():
            # WARNING, not INFO: Python's and transformers' default level (and the scripts' `--log_level
            # warning`/`passive`) hide INFO, and a rank change replaces parameters mid-run: the user must see it.
            _, fraction = self._held_params(summary)
            logger.warning("step %d: %s %s: %d of %d target layers factorized, rank fraction %.1f%%, "
                           "target-layer parameters %.1f%% of dense", step, self.method.name, event,
                           len(summary.layers), len(self.targets),
                           100 * (summary.rank_fraction if summary.layers else 1.0), 100 * fraction)

    # --- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"global_step": self.global_step, "history": self.history, "started": self.started,
                "method": self.method.name, "method_state": self.method.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("method") != self.method.name:
            raise ValueError(f"Checkpoint was trained with method {state.get('method')!r}, this run uses "
                             f"{self.method.name!r}.")
        self.global_step = state["global_step"]
        self.history = state["history"]
        self.started = state["started"]
        self.method.load_state_dict(state["method_state"])

    def save(self, directory: str) -> None:
        """Write the controller's state (JSON), the method's tensors (safetensors) and the model's current
        factorized structure into `directory` (e.g. next to `accelerator.save_state(directory)`)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, STATE_NAME), "w") as f:
            json.dump(self.state_dict(), f)
        with open(os.path.join(directory, STRUCTURE_NAME), "w") as f:
            json.dump(LowRankQuantizationConfig.from_model(self.model).to_dict(), f)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.method.tensor_state().items()}
        if tensors:
            save_file(tensors, os.path.join(directory, TENSORS_NAME))
        self.save_history(directory)

    def load(self, directory: str) -> bool:
        """Restore what `save` wrote; returns False when `directory` holds no controller state."""
        from safetensors.torch import load_file

        path = os.path.join(directory, STATE_NAME)
        if not os.path.isfile(path):
            return False
        with open(path) as f:
            self.load_state_dict(json.load(f))
        tensor_path = os.path.join(directory, TENSORS_NAME)
        if os.path.isfile(tensor_path):
            device = next(self.model.parameters()).device
            self.method.load_tensor_state({k: v.to(device) for k, v in load_file(tensor_path).items()})
        return True

    @staticmethod
    def restructure(model: nn.Module, directory: str) -> bool:
        """Give a freshly built model the ranks saved in `directory`; call it before creating the
        optimizer and `accelerator.prepare` when resuming a raw loop (then `accelerator.load_state` and
        `controller.load`)."""
        return restructure_like_checkpoint(unwrap(model), directory)

    def save_history(self, directory: str) -> None:
        """`lowrank_history.json`: the ranks after every change, for cards and plots."""
        save_rank_history(directory, self.method.name, self.config.to_dict(), self.history)


def _is_main_process() -> bool:
    return not is_distributed() or torch.distributed.get_rank() == 0


def _check_accelerator(accelerator) -> None:
    """Refuse unsupported sharded training (FSDP2 needs an opt-in); warn when several processes were launched
    but do not form one group."""
    if accelerator is None:
        return
    check_sharded_training(accelerator)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and accelerator.num_processes == 1:
        warnings.warn(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but the accelerator runs a single process: the processes train "
            "independently. On CPU, create the Accelerator with cpu=True (TrainingArguments(use_cpu=True)) or "
            "set ACCELERATE_USE_CPU=1.")
