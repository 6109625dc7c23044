#!/usr/bin/env python
"""Image classification (ViT and other `AutoModelForImageClassification` models) with adaptive low-rank
training.

Hugging Face's `run_image_classification.py` plus the low-rank arguments (`--lowrank_method
oialr|inrank|svd|none` and every method knob under its `LowRankConfig` name). Data: a Hub dataset
(`--dataset_name`, e.g. `uoft-cs/cifar10`) or image folders (`--train_dir/--validation_dir`, one
sub-folder per class, read with the `imagefolder` builder); columns `--image_column_name` (default `image`)
and `--label_column_name` (default `label`). Accuracy is computed here (no `evaluate` download).

    python training_scripts/run_image_classification.py --model_name_or_path google/vit-base-patch16-224-in21k \\
        --dataset_name uoft-cs/cifar10 --image_column_name img --do_train --do_eval \\
        --output_dir outputs/vit-cifar10-oialr --lowrank_method oialr --delay_steps 0.3 --update_every 0.1

A model built from a config (`--model_type vit --config_overrides image_size=32,patch_size=4,...` or
`--config_name`) gets an image processor built locally: `ViTImageProcessor` resizing to the config's
`image_size` and normalizing with mean = std = 0.5 (its PIL implementation when torchvision is not installed) (or `--image_processor_name DIR`).
Augmentation: random horizontal flips of the training images (torchvision is not needed).
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass, field
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    CONFIG_MAPPING,
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING,
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    TrainingArguments,
    ViTImageProcessor,
    ViTImageProcessorPil,
    set_seed,
)
from transformers.utils import is_torchvision_available  # noqa: E402

import hf_lowrank  # noqa: E402,F401  (registers the quantizer: saved low-rank models reload factorized)
from lowrank_args import LowRankArguments  # noqa: E402
from script_utils import (  # noqa: E402
    BaseDataArguments, BaseModelArguments, check_column, check_lowrank_args, check_model_args, check_push,
    check_training_args, config_with_overrides, fail, from_pretrained, hub_kwargs, load_hub_dataset,
    load_local_dataset, model_card_kwargs, model_type_field, parse_arguments, prepare_lowrank_model, print_summary,
    publish_model, run_training, save_final_model, say, setup_logging, take_samples, trainer_class,
)

MODEL_TYPES = tuple(conf.model_type for conf in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING.keys())


@dataclass
class ModelArguments(BaseModelArguments):
    """Which model/config/image processor to fine-tune or train (as in the HF run_image_classification.py,
    plus building from a config)."""

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Path to pretrained model or model identifier from huggingface.co/models, e.g. "
                  "google/vit-base-patch16-224-in21k (or build one from a config with --model_type/--config_name)."},
    )
    model_type: Optional[str] = model_type_field(MODEL_TYPES)
    config_overrides: Optional[str] = field(
        default=None,
        metadata={"help": "Override default config settings of --model_type. Example: "
                  "image_size=32,patch_size=4,hidden_size=192,num_hidden_layers=6,num_attention_heads=3,"
                  "intermediate_size=768"},
    )
    cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Where do you want to store the pretrained models downloaded from the Hub"}
    )
    image_processor_name: Optional[str] = field(default=None, metadata={"help": "Name or path of preprocessor config."})
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Will enable to load a pretrained model whose head dimensions are different."},
    )


@dataclass
class DataTrainingArguments(BaseDataArguments):
    """What data to train and evaluate on (as in the HF run_image_classification.py)."""

    dataset_name: Optional[str] = field(
        default=None,
        metadata={"help": "Name of a dataset from the hub (could be your own, possibly private dataset hosted on "
                  "the hub)."},
    )
    train_dir: Optional[str] = field(default=None, metadata={"help": "A folder containing the training data."})
    validation_dir: Optional[str] = field(default=None, metadata={"help": "A folder containing the validation data."})
    train_val_split: Optional[float] = field(
        default=0.15, metadata={"help": "Percent to split off of train for validation."}
    )
    image_column_name: str = field(
        default="image", metadata={"help": "The name of the dataset column containing the image data."}
    )
    label_column_name: str = field(
        default="label", metadata={"help": "The name of the dataset column containing the labels."}
    )


def validate(model_args, data_args, training_args) -> None:
    check_training_args(training_args)
    check_model_args(model_args, MODEL_TYPES,
                     "no model: pass --model_name_or_path (a checkpoint, e.g. google/vit-base-patch16-224-in21k), or "
                     "--model_type (e.g. vit, with --config_overrides) or --config_name to build one from a config.",
                     "has no image-classification model")
    if data_args.dataset_name is None and data_args.train_dir is None and data_args.validation_dir is None:
        fail("no data: pass --dataset_name (a Hub dataset) or --train_dir/--validation_dir (image folders with one "
             "sub-folder per class).")
    for flag, path in (("train_dir", data_args.train_dir), ("validation_dir", data_args.validation_dir)):
        if path is not None and not os.path.isdir(path):
            fail(f"--{flag} {path!r} is not a directory (working directory {os.getcwd()!r}): pass a folder with "
                 "one sub-folder of images per class.")


def main(argv: Optional[list[str]] = None) -> dict:
    (model_args, data_args, lowrank_args, training_args), _ = parse_arguments(
        (ModelArguments, DataTrainingArguments, LowRankArguments, TrainingArguments), argv)
    setup_logging(training_args)
    validate(model_args, data_args, training_args)
    lowrank_config = check_lowrank_args(lowrank_args)
    push = check_push(training_args)
    set_seed(training_args.seed)
    # The transforms below read the image column, which the Trainer would otherwise drop as "unused".
    training_args.remove_unused_columns = False

    # --- data ---
    if data_args.dataset_name is not None:
        dataset = load_hub_dataset(data_args.dataset_name, data_args.dataset_config_name,
                                   local_hint="--train_dir/--validation_dir", cache_dir=model_args.cache_dir,
                                   token=model_args.token)
    else:
        data_files = {}
        if data_args.train_dir is not None:
            data_files["train"] = os.path.join(data_args.train_dir, "**")
        if data_args.validation_dir is not None:
            data_files["validation"] = os.path.join(data_args.validation_dir, "**")
        dataset = load_local_dataset("imagefolder", data_files, cache_dir=model_args.cache_dir)
    if "validation" not in dataset and "train" in dataset and data_args.train_val_split:
        split = dataset["train"].train_test_split(data_args.train_val_split, seed=training_args.seed)
        dataset["train"], dataset["validation"] = split["train"], split["test"]
    for wanted, flag in (("train", "--do_train"), ("validation", "--do_eval")):
        if getattr(training_args, flag[2:]) and wanted not in dataset:
            fail(f"{flag} needs a {wanted} split; the data has {list(dataset)}.")
    reference = "train" if training_args.do_train else "validation"
    columns = dataset[reference].column_names
    check_column(columns, data_args.image_column_name, "--image_column_name", f"the {reference} data")
    check_column(columns, data_args.label_column_name, "--label_column_name", f"the {reference} data")

    label_feature = dataset[reference].features[data_args.label_column_name]
    if getattr(label_feature, "names", None):
        labels = list(label_feature.names)
        to_id = None
    else:
        labels = sorted({str(v) for split in dataset for v in dataset[split].unique(data_args.label_column_name)})
        to_id = {label: i for i, label in enumerate(labels)}
    if len(labels) < 2:
        fail(f"the label column {data_args.label_column_name!r} holds {len(labels)} class(es): classification "
             "needs at least two (an image folder needs one sub-folder per class).")
    label2id = {label: i for i, label in enumerate(labels)}
    id2label = {i: label for i, label in enumerate(labels)}

    # --- config, model, image processor ---
    common = hub_kwargs(model_args)
    label_kwargs = {"num_labels": len(labels), "label2id": label2id, "id2label": id2label}
    if model_args.config_name or model_args.model_name_or_path:
        config = from_pretrained(AutoConfig.from_pretrained, model_args.config_name or model_args.model_name_or_path,
                                 "config", finetuning_task="image-classification", **label_kwargs, **common)
    else:
        config = config_with_overrides(CONFIG_MAPPING[model_args.model_type](**label_kwargs),
                                       model_args.config_overrides)
    if model_args.model_name_or_path:
        model = from_pretrained(AutoModelForImageClassification.from_pretrained, model_args.model_name_or_path,
                                "model", config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
                                **common)
    else:
        model = AutoModelForImageClassification.from_config(config, trust_remote_code=model_args.trust_remote_code)
    if model_args.image_processor_name or model_args.model_name_or_path:
        image_processor = from_pretrained(AutoImageProcessor.from_pretrained,
                                          model_args.image_processor_name or model_args.model_name_or_path,
                                          "image processor", **common)
    else:
        image_size = getattr(config, "image_size", None)
        if not isinstance(image_size, int):
            fail(f"cannot build an image processor for {config.model_type!r} from its config (no integer "
                 "image_size): pass --image_processor_name.")
        # The PIL implementation when torchvision is missing (same saved config, "ViTImageProcessor").
        processor_class = ViTImageProcessor if is_torchvision_available() else ViTImageProcessorPil
        image_processor = processor_class(size={"height": image_size, "width": image_size},
                                          image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    say(f"model: {type(model).__name__} ({model_args.model_name_or_path or 'from a config'}), "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, {len(labels)} classes", training_args)
    model = prepare_lowrank_model(model, lowrank_config)

    # --- transforms (applied on the fly, like the HF example) ---
    rng = random.Random(training_args.seed)
    image_column, label_column = data_args.image_column_name, data_args.label_column_name

    def to_label(value):
        return value if to_id is None else to_id[str(value)]

    def transform(batch, train: bool):
        images = [image.convert("RGB") for image in batch[image_column]]
        if train:
            images = [image.transpose(0) if rng.random() < 0.5 else image for image in images]  # 0 = FLIP_LEFT_RIGHT
        pixels = image_processor(images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": list(pixels), "labels": [to_label(v) for v in batch[label_column]]}

    train_dataset = eval_dataset = None
    if training_args.do_train:
        train_dataset = take_samples(dataset["train"], data_args.max_train_samples, shuffle_seed=training_args.seed)
        train_dataset.set_transform(lambda batch: transform(batch, train=True))
    if training_args.do_eval:
        eval_dataset = take_samples(dataset["validation"], data_args.max_eval_samples, shuffle_seed=training_args.seed)
        eval_dataset.set_transform(lambda batch: transform(batch, train=False))

    def collate_fn(examples):
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "labels": torch.tensor([e["labels"] for e in examples])}

    def compute_metrics(p):
        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        return {"accuracy": float((np.argmax(preds, axis=1) == p.label_ids).mean())}

    trainer = trainer_class(lowrank_config)(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        compute_metrics=compute_metrics, processing_class=image_processor, data_collator=collate_fn,
    )
    card_kwargs = model_card_kwargs(model_args, data_args, training_args, "run_image_classification.py",
                                    (data_args.train_dir, data_args.validation_dir))
    # Training
    results, train_seconds = {}, None
    if training_args.do_train:
        train_result, train_seconds = run_training(trainer, lowrank_config, training_args, len(train_dataset))
        save_final_model(trainer, training_args.output_dir)  # the smallest form, atomically, with the processor
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results.update(metrics)

    # Evaluation
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)

    # What was compressed and what it cost; the model card; the Hub
    summary = print_summary(model, lowrank_config, results, training_args.output_dir, training_args,
                            "AutoModelForImageClassification", train_seconds=train_seconds, trainer=trainer,
                            saved_model=training_args.do_train)
    if training_args.do_train:
        publish_model(model, trainer, training_args, push, card_kwargs)
    return {"metrics": results, "summary": summary, "output_dir": training_args.output_dir, "trainer": trainer}


if __name__ == "__main__":
    main()
