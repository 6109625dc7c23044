"""`LowRankController`: drives a method's schedule from a training loop.

One call after each `optimizer.step()` performs any due rank change (decided on process 0, broadcast,
applied by surgery with the optimizer state carried over) and says whether the model's parameters
changed; `reprepare` then re-wraps the model for the accelerator. `LowRankTrainer` is a thin user of it.

A raw `accelerate` loop::

    model = get_lowrank_model(model, LowRankConfig(method="oialr", delay_steps=500, update_every=100))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    controller = LowRankController(model, optimizer=optimizer, accelerator=accelerator,
                                   num_training_steps=len(loader))
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            optimizer.step(); scheduler.step(); optimizer.zero_grad()
        if controller.step():
            model = controller.reprepare(model)
"""

from __future__ import annotations

import json
import os
import time
import warnings
from typing import Optional

import torch
from torch import nn

from .config import LowRankConfig
from .history import save_rank_history
from .layers import LowRankLinear
from .methods import get_method
from .serialization import (STRUCTURE_NAME, LowRankQuantizationConfig, restructure_like_checkpoint,
                            sync_quantization_config)
from .summary import lowrank_summary
from .surgery import apply_changes, broadcast_changes, is_distributed, reprepare
from .targets import find_targets

STATE_NAME = "lowrank_state.json"
TENSORS_NAME = "lowrank_state.safetensors"


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
        num_training_steps: total optimizer steps, needed when schedule knobs are given as fractions.
    """

    def __init__(self, model: nn.Module, config: Optional[LowRankConfig] = None, optimizer=None,
                 accelerator=None, num_training_steps: Optional[int] = None):
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
        self.num_training_steps = num_training_steps
        self.global_step = 0
        self.history: list[dict] = []
        self.started = False
        # wall-clock spent in rank updates (decision, broadcast, surgery) and re-prepares, for benchmarks
        self.update_seconds = 0.0

    # --- the training-loop calls ----------------------------------------------------------------------
    def begin(self) -> None:
        """Start of training (the first `step` calls it): lets the method take its snapshots and records
        the starting ranks. Safe to call more than once."""
        if self.started:
            return
        self.started = True
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
        main = not is_distributed() or torch.distributed.get_rank() == 0
        changes = self.method.decide(self.model, self.targets, global_step, self.num_training_steps) if main else None
        device = next(self.model.parameters()).device
        changes = broadcast_changes(changes, device)
        changed = apply_changes(self.model, changes, self.optimizer)
        if changes:
            sync_quantization_config(self.model)  # every checkpoint from now on records the new ranks
        self.method.commit(changes, global_step)
        events = sorted({c.info.get("event", "update") for c in changes if not c.holds_dense})
        if events:
            self._record(global_step, "+".join(events))
        self.update_seconds += time.perf_counter() - start
        return changed

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
        factorized = summary.params
        dense_targets = sum(self._dense_size(name) for name in self.targets)
        held = factorized + sum(self._dense_size(n) for n in self.targets
                                if not isinstance(self.model.get_submodule(n), LowRankLinear))
        return {
            "lowrank/rank_fraction": summary.rank_fraction if summary.layers else 1.0,
            "lowrank/trainable_params": float(summary.trainable_params),
            "lowrank/factorized_layer_params": float(held),
            "lowrank/param_fraction": held / dense_targets if dense_targets else 1.0,
        }

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


def _check_accelerator(accelerator) -> None:
    """Refuse sharded training; warn when several processes were launched but do not form one group."""
    if accelerator is None:
        return
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise RuntimeError(
            f"hf_lowrank does not support {accelerator.distributed_type.value}: rank changes replace parameters, "
            "which sharded training would silently stop synchronizing. Use DDP (`accelerate launch --multi_gpu`, "
            "or multi-CPU) instead; compress a model with method='svd' first if it must be sharded.")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and accelerator.num_processes == 1:
        warnings.warn(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but the accelerator runs a single process: the processes train "
            "independently. On CPU, create the Accelerator with cpu=True (TrainingArguments(use_cpu=True)) or "
            "set ACCELERATE_USE_CPU=1.")
