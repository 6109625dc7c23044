"""`LowRankTrainer`: a `transformers.Trainer` that runs the low-rank schedule. Thin: all rank logic is in
the controller, methods and surgery."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .controller import LowRankController
from .serialization import restructure_like_checkpoint
from .sharding import check_sharded_training

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
        # DeepSpeed and FSDP1 are refused; accelerate's FSDP2 only with HF_LOWRANK_ALLOW_FSDP2=1 (unproven on GPUs)
        check_sharded_training(self.accelerator)
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

    # --- model card and Hub: ours, with the Trainer's signatures ---------------------------------------
    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None):
        """Write the hf_lowrank model card (`README.md` and its plots) into `args.output_dir`, in place of the
        Trainer's generic one: per-layer ranks, compression, method settings, rank history, evaluation results.

        Same arguments as `Trainer.create_model_card`; the card's numbers describe the model in memory (call it
        after `save_model`, as the example scripts do). A hand-written README.md is kept (with a warning).

        Args:
            language, license: Hub metadata.
            tags: extra tags (with `generated_from_trainer` and the model's own `model_tags`).
            model_name: the card's title and `model-index` name (default: the output directory's name).
            finetuned_from: the base model's Hub id (default: the model's `name_or_path` unless it is a local
                directory); becomes `base_model`.
            tasks: accepted for compatibility; the pipeline tag comes from the model class.
            dataset_tags: Hub dataset ids (default: the train/eval dataset's builder, unless a local-file one).
            dataset: the evaluated dataset's display name; dataset_args: its configuration.
        """
        if not self.is_world_process_zero():
            return
        from .hub.card import save_model_card

        kwargs = self._card_arguments(language=language, license=license, tags=tags, model_name=model_name,
                                      finetuned_from=finetuned_from, dataset_tags=dataset_tags, dataset=dataset,
                                      dataset_args=dataset_args)
        try:
            save_model_card(self.model, self.args.output_dir, source_dir=self.args.output_dir, **kwargs)
        except FileExistsError as error:  # a hand-written README.md: never lost
            warnings.warn(str(error))

    def push_to_hub(self, commit_message="End of training", blocking=True, token=None, revision=None,
                    private=None, **kwargs):
        """Save the model into `args.output_dir`, write its hf_lowrank card there, and upload the model in its
        smallest form with that card (`hf_lowrank.push_to_hub`, one commit) to `args.hub_model_id` (default:
        the output directory's name, in the token owner's namespace).

        Same signature as `Trainer.push_to_hub`. The upload is always blocking; `blocking` is accepted for
        compatibility. Returns the `CommitInfo` (None on processes other than the main one).

        Args:
            commit_message: the commit message.
            blocking: ignored (always blocking).
            token: Hub token (default `args.hub_token`); private: for a new repository (default
                `args.hub_private_repo`); revision: branch to push to (default `args.hub_revision`).
            kwargs: `create_model_card` arguments (`model_name`, `finetuned_from`, `dataset`, `tags`, ...).
        """
        from .hub.push import push_to_hub

        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        if kwargs.get("model_name") is None:
            kwargs["model_name"] = (self.args.hub_model_id or Path(self.args.output_dir).absolute().name).split("/")[-1]
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self.create_model_card(**kwargs)  # the local copy carries the card that is uploaded
        self._finish_current_push()  # checkpoint pushes still running go first
        return push_to_hub(
            self.model, self.hub_model_id or self.args.hub_model_id or Path(self.args.output_dir).absolute().name,
            processing_class=self.processing_class, token=token if token is not None else self.args.hub_token,
            private=private if private is not None else self.args.hub_private_repo, commit_message=commit_message,
            revision=revision if revision is not None else self.args.hub_revision, source_dir=self.args.output_dir,
            **self._card_arguments(**{k: v for k, v in kwargs.items() if k != "tasks"}))

    def _card_arguments(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                        dataset_tags=None, dataset=None, dataset_args=None) -> dict:
        """`make_model_card` arguments from the Trainer's card arguments, with the Trainer's defaults."""
        from .hub.card import read_eval_results

        sample = self.eval_dataset if self.eval_dataset is not None else self.train_dataset
        builder = getattr(sample, "builder_name", None)  # a datasets.Dataset; local-file builders are no Hub ids
        if dataset_tags is None and builder and builder not in ("csv", "json", "pandas", "parquet", "text"):
            dataset_tags, dataset_args = builder, dataset_args or getattr(sample, "config_name", None)
        name_or_path = getattr(getattr(self.model, "config", None), "_name_or_path", None)
        if finetuned_from is None and name_or_path and not os.path.isdir(name_or_path):
            finetuned_from = name_or_path
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        own = ["generated_from_trainer", *(getattr(self.model, "model_tags", None) or [])]
        tags += [t for t in own if t not in tags]
        logged = next((entry for entry in reversed(self.state.log_history)
                       if any(k.startswith("eval_") for k in entry)), {})
        results = {**{k: v for k, v in logged.items() if k.startswith("eval_")},
                   **read_eval_results(self.args.output_dir)}  # the files the example scripts write win
        return {"model_name": model_name or Path(self.args.output_dir).name, "base_model": finetuned_from,
                "datasets": dataset_tags, "dataset_name": _first(dataset), "dataset_config": _first(dataset_args),
                "eval_results": results, "language": language, "license": license, "tags": tags}

    def _save(self, output_dir=None, state_dict=None):
        # The Trainer pickles its arguments into training_args.bin (final model and every checkpoint): never the
        # Hub token. It is back in place for the Trainer's own pushes right after.
        token, self.args.hub_token = self.args.hub_token, None
        try:
            super()._save(output_dir, state_dict)
        finally:
            self.args.hub_token = token
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
        from .serialization import CheckpointError, check_checkpoint_fits, load_checkpoint_weights

        if not os.path.isfile(os.path.join(resume_from_checkpoint, COMPLETE_MARKER)):
            raise CheckpointError(f"{resume_from_checkpoint} is an incomplete checkpoint (the run was interrupted "
                                  "while writing it); resume from an earlier one.")
        # Give the model the checkpoint's ranks first: the Trainer loads non-strictly and would otherwise
        # silently skip every factor. Then compare every tensor: a checkpoint of another architecture would
        # fail inside the optimizer load, or leave layers at their initial values.
        restructure_like_checkpoint(model or self.model, resume_from_checkpoint)
        check_checkpoint_fits(model or self.model, resume_from_checkpoint)
        # Not the Trainer's own load: it reads the names as saved, which transformers 5 renames for some models.
        load_checkpoint_weights(model or self.model, resume_from_checkpoint)
        self.lowrank.load(resume_from_checkpoint)

    def train(self, resume_from_checkpoint=None, *pos, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint=True` takes the newest complete checkpoint of `output_dir`.
        A checkpoint that is missing, incomplete or from another architecture raises a `CheckpointError`
        before anything trains."""
        from .serialization import CheckpointError

        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise CheckpointError(f"No complete checkpoint found in {self.args.output_dir} to resume from: "
                                      "train without resume_from_checkpoint, or pass a checkpoint-N folder.")
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)) and not os.path.isdir(resume_from_checkpoint):
            problem = "is not a directory" if os.path.exists(resume_from_checkpoint) else "does not exist"
            raise CheckpointError(f"resume_from_checkpoint {str(resume_from_checkpoint)!r} {problem}: pass a "
                                  "checkpoint-N folder this Trainer wrote, or True for the newest complete one in "
                                  "output_dir.")
        return super().train(resume_from_checkpoint, *pos, **kwargs)


def _first(value):
    """The Trainer's card arguments may be a string or a list; the card describes one evaluated dataset."""
    return value[0] if isinstance(value, (list, tuple)) and value else value


def last_complete_checkpoint(folder: str):
    """The newest `checkpoint-N` in `folder` that was fully written (or None). Other folders, e.g. a copy
    named `checkpoint-20-backup`, are ignored."""
    if not os.path.isdir(folder):
        return None
    candidates = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        prefix, _, step = name.rpartition("-")
        if (prefix == PREFIX_CHECKPOINT_DIR and step.isascii() and step.isdigit()
                and os.path.isfile(os.path.join(path, COMPLETE_MARKER))):
            candidates.append((int(step), path))
    return max(candidates)[1] if candidates else None
