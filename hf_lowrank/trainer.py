"""`LowRankTrainer`: a `transformers.Trainer` that runs the low-rank schedule. Thin: all rank logic is in
the controller, methods and surgery."""

from __future__ import annotations

import os
import warnings

from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .controller import LowRankController
from .serialization import restructure_like_checkpoint

COMPLETE_MARKER = "lowrank_checkpoint_complete"


class LowRankCallback(TrainerCallback):
    """Calls the controller after every optimizer step (when the gradients are gone)."""

    def __init__(self, trainer: "LowRankTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        controller = self.trainer.lowrank
        controller.optimizer = self.trainer.optimizer
        controller.accelerator = self.trainer.accelerator
        controller.num_training_steps = state.max_steps
        controller.begin()

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer.lowrank.step_to(state.global_step):
            trainer.model_wrapped = trainer.lowrank.reprepare(trainer.model_wrapped)


class LowRankTrainer(Trainer):
    """Built exactly like `Trainer`; reads the `LowRankConfig` that `get_lowrank_model` attached to the model.

    Adds to the Trainer: rank changes on schedule (optimizer state carried over, DDP re-prepared),
    compression figures in the training logs (`lowrank/*`), `lowrank_history.json` beside saved models,
    and checkpoints that resume exactly across rank changes.
    """

    def __init__(self, model=None, args=None, *pos, **kwargs):
        if model is not None and getattr(model, "lowrank_config", None) is None:
            raise ValueError("LowRankTrainer needs a model prepared with hf_lowrank.get_lowrank_model(model, "
                             "LowRankConfig(...)) (or loaded from a low-rank checkpoint after `import hf_lowrank`).")
        super().__init__(model, args, *pos, **kwargs)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise RuntimeError("LowRankTrainer does not support FSDP or DeepSpeed: rank changes replace "
                               "parameters, which sharded training would stop synchronizing. Use DDP.")
        if self.args.fp16 and self.accelerator.device.type == "cpu":
            warnings.warn("fp16 on CPU trains in float32 (accelerate has no CPU fp16 autocast); use --bf16.")
        self.lowrank = LowRankController(self.model, accelerator=self.accelerator)
        self.add_callback(LowRankCallback(self))
        for callback in self.callback_handler.callbacks:  # diagnostics log through this Trainer's integrations
            if callable(getattr(callback, "bind_trainer", None)) and getattr(callback, "trainer", None) is None:
                callback.bind_trainer(self)

    def training_step(self, model, inputs, num_items_in_batch=None):
        # The epoch loop keeps the model it started with; after a re-prepare only model_wrapped is current.
        return super().training_step(self.model_wrapped, inputs, num_items_in_batch)

    def log(self, logs, start_time=None):
        if "loss" in logs:
            logs.update(self.lowrank.metrics())
        super().log(logs, start_time)

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            self.lowrank.save_history(output_dir or self.args.output_dir)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        checkpoint = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            self.lowrank.save(checkpoint)
            # Written last: a checkpoint without it was interrupted and is never resumed from.
            open(os.path.join(checkpoint, COMPLETE_MARKER), "w").close()

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not os.path.isfile(os.path.join(resume_from_checkpoint, COMPLETE_MARKER)):
            raise ValueError(f"{resume_from_checkpoint} is an incomplete checkpoint (the run was interrupted while "
                             "writing it); resume from an earlier one.")
        # Give the model the checkpoint's ranks first: the Trainer loads non-strictly and would otherwise
        # silently skip every factor.
        restructure_like_checkpoint(model or self.model, resume_from_checkpoint)
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.lowrank.load(resume_from_checkpoint)

    def train(self, resume_from_checkpoint=None, *pos, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint found in {self.args.output_dir} to resume from.")
        return super().train(resume_from_checkpoint, *pos, **kwargs)


def last_complete_checkpoint(folder: str):
    """The newest `checkpoint-N` in `folder` that was fully written (or None)."""
    if not os.path.isdir(folder):
        return None
    candidates = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") and os.path.isfile(os.path.join(path, COMPLETE_MARKER)):
            candidates.append((int(name.rsplit("-", 1)[1]), path))
    return max(candidates)[1] if candidates else None
