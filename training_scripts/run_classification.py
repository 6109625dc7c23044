#!/usr/bin/env python
"""Text classification (BERT family and other `AutoModelForSequenceClassification` models) with adaptive
low-rank training.

Hugging Face's `run_classification.py` plus the low-rank arguments (`--lowrank_method oialr|inrank|svd|none`
and every method knob under its `LowRankConfig` name). Data: a Hub dataset (`--dataset_name`) or local
csv/json files (`--train_file/--validation_file`); text from `--text_column_names` (comma-separated, joined
with `--text_column_delimiter`; default `sentence`), labels from `--label_column_name` (default `label`).
Metrics are computed here (accuracy, or mse for regression), no `evaluate` download.

    python training_scripts/run_classification.py --model_name_or_path bert-base-uncased \\
        --dataset_name nyu-mll/glue --dataset_config_name sst2 --text_column_names sentence \\
        --do_train --do_eval --output_dir outputs/bert-sst2-oialr \\
        --lowrank_method oialr --delay_steps 0.3 --update_every 0.1

A model built from a config (`--model_type bert --config_overrides hidden_size=256,...` or `--config_name`)
needs a tokenizer: `--tokenizer_name DIR` (a local tokenizer directory, or a Hub id), or
`--train_tokenizer_vocab_size N` to train a byte-level BPE tokenizer of N tokens on the training texts
(demo_corpus.train_tokenizer; cached, saved with the model). Such a model gets `vocab_size =
len(tokenizer)` unless `--config_overrides` sets it. Multi-label classification and `--do_predict` of the
HF script are not supported here.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from datasets import Value  # noqa: E402
from transformers import (  # noqa: E402
    CONFIG_MAPPING,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

import hf_lowrank  # noqa: E402,F401  (registers the quantizer: saved low-rank models reload factorized)
from lowrank_args import LowRankArguments  # noqa: E402
from script_utils import (  # noqa: E402
    BaseDataArguments, BaseTextModelArguments, check_column, check_local_files, check_lowrank_args,
    check_model_args, check_push, check_tokenizer_args, check_training_args, column_texts, config_with_overrides,
    fail, from_pretrained, hf_lowrank_cache, hub_kwargs, load_hub_dataset, load_local_dataset, model_card_kwargs,
    model_type_field, overridden_keys, parse_arguments, prepare_lowrank_model, print_summary, publish_model,
    run_training, save_final_model, say, setup_logging, take_samples, trained_tokenizer, trainer_class,
)

MODEL_TYPES = tuple(conf.model_type for conf in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING.keys())


@dataclass
class ModelArguments(BaseTextModelArguments):
    """Which model/config/tokenizer to fine-tune or train (as in the HF run_classification.py, plus building
    from a config)."""

    model_type: Optional[str] = model_type_field(MODEL_TYPES)
    config_overrides: Optional[str] = field(
        default=None,
        metadata={"help": "Override default config settings of --model_type. Example: "
                  "hidden_size=256,num_hidden_layers=4,num_attention_heads=4,intermediate_size=1024"},
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Will enable to load a pretrained model whose head dimensions are different."},
    )


@dataclass
class DataTrainingArguments(BaseDataArguments):
    """What data to train and evaluate on (as in the HF run_classification.py)."""

    do_regression: Optional[bool] = field(
        default=None,
        metadata={"help": "Whether to do regression instead of classification. If None, will be inferred from the "
                  "dataset."},
    )
    text_column_names: Optional[str] = field(
        default=None,
        metadata={"help": "The name of the text column in the input dataset or a CSV/JSON file (several: comma-"
                  "separated, joined with --text_column_delimiter). If not specified, will use the \"sentence\" "
                  "column."},
    )
    text_column_delimiter: Optional[str] = field(
        default=" ", metadata={"help": "The delimiter to use to join text columns into a single sentence."}
    )
    train_split_name: Optional[str] = field(
        default=None, metadata={"help": "The name of the train split in the input dataset (default: train)."}
    )
    validation_split_name: Optional[str] = field(
        default=None,
        metadata={"help": "The name of the validation split in the input dataset (default: validation)."},
    )
    remove_splits: Optional[str] = field(
        default=None,
        metadata={"help": "The splits to remove from the dataset. Multiple splits should be separated by commas."},
    )
    remove_columns: Optional[str] = field(
        default=None,
        metadata={"help": "The columns to remove from the dataset. Multiple columns should be separated by commas."},
    )
    label_column_name: Optional[str] = field(
        default=None,
        metadata={"help": "The name of the label column in the input dataset or a CSV/JSON file. If not specified, "
                  "will use the \"label\" column."},
    )
    max_seq_length: int = field(
        default=128,
        metadata={"help": "The maximum total input sequence length after tokenization. Sequences longer than this "
                  "will be truncated, sequences shorter will be padded."},
    )
    preprocessing_num_workers: Optional[int] = field(
        default=None, metadata={"help": "The number of processes to use for the preprocessing."}
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Overwrite the cached preprocessed datasets or not."})
    pad_to_max_length: bool = field(
        default=True,
        metadata={"help": "Whether to pad all samples to `max_seq_length`. If False, will pad the samples "
                  "dynamically when batching to the maximum length in the batch."},
    )
    shuffle_train_dataset: bool = field(default=False, metadata={"help": "Whether to shuffle the train dataset or not."})
    shuffle_seed: int = field(default=42, metadata={"help": "Random seed that will be used to shuffle the train dataset."})
    train_file: Optional[str] = field(default=None, metadata={"help": "A csv or a json file containing the training data."})
    validation_file: Optional[str] = field(
        default=None, metadata={"help": "A csv or a json file containing the validation data."}
    )


def validate(model_args, data_args, training_args) -> None:
    check_training_args(training_args)
    check_model_args(model_args, MODEL_TYPES,
                     "no model: pass --model_name_or_path (a checkpoint, e.g. bert-base-uncased), or --model_type "
                     "(e.g. bert, with --config_overrides) or --config_name to build one from a config.",
                     "has no sequence-classification model")
    check_tokenizer_args(model_args, "training texts")
    if data_args.dataset_name is None:
        if data_args.train_file is None or data_args.validation_file is None:
            fail("no data: pass --dataset_name (a Hub dataset) or both --train_file and --validation_file "
                 "(csv or json).")
        check_local_files(train_file=data_args.train_file, validation_file=data_args.validation_file)
        extensions = {path.rsplit(".", 1)[-1] for path in (data_args.train_file, data_args.validation_file)}
        if len(extensions) != 1 or not extensions <= {"csv", "json", "jsonl"}:
            fail("--train_file and --validation_file should both be csv, or both json files.")


def main(argv: Optional[list[str]] = None) -> dict:
    (model_args, data_args, lowrank_args, training_args), _ = parse_arguments(
        (ModelArguments, DataTrainingArguments, LowRankArguments, TrainingArguments), argv)
    setup_logging(training_args)
    validate(model_args, data_args, training_args)
    lowrank_config = check_lowrank_args(lowrank_args)
    push = check_push(training_args)
    set_seed(training_args.seed)

    # --- data ---
    if data_args.dataset_name is not None:
        raw_datasets = load_hub_dataset(data_args.dataset_name, data_args.dataset_config_name,
                                        cache_dir=model_args.cache_dir, token=model_args.token)
    else:
        data_files = {"train": data_args.train_file, "validation": data_args.validation_file}
        builder = "csv" if data_args.train_file.endswith(".csv") else "json"
        raw_datasets = load_local_dataset(builder, data_files, cache_dir=model_args.cache_dir)
    if data_args.remove_splits is not None:
        for split in data_args.remove_splits.split(","):
            raw_datasets.pop(split, None)
    for flag, wanted, default in (("--train_split_name", data_args.train_split_name, "train"),
                                  ("--validation_split_name", data_args.validation_split_name, "validation")):
        if wanted is not None:
            if wanted not in raw_datasets:
                fail(f"{flag} {wanted!r} is not a split of the dataset; its splits are {list(raw_datasets)}.")
            raw_datasets[default] = raw_datasets.pop(wanted)
    if training_args.do_train and "train" not in raw_datasets:
        fail(f"--do_train needs a train split; the dataset has {list(raw_datasets)} (see --train_split_name).")
    if training_args.do_eval and "validation" not in raw_datasets:
        fail(f"--do_eval needs a validation split; the dataset has {list(raw_datasets)} (see --validation_split_name).")
    if data_args.remove_columns is not None:
        for split in raw_datasets:
            raw_datasets[split] = raw_datasets[split].remove_columns(
                [c for c in data_args.remove_columns.split(",") if c in raw_datasets[split].column_names])
    reference = "train" if training_args.do_train else "validation"
    columns = raw_datasets[reference].column_names
    text_columns = (data_args.text_column_names or "sentence").split(",")
    for column in text_columns:
        check_column(columns, column, "--text_column_names", f"the {reference} data")
    label_column = data_args.label_column_name or "label"
    check_column(columns, label_column, "--label_column_name", f"the {reference} data")
    if label_column != "label":
        for split in raw_datasets:
            if "label" in raw_datasets[split].column_names:
                raw_datasets[split] = raw_datasets[split].remove_columns("label")
            raw_datasets[split] = raw_datasets[split].rename_column(label_column, "label")

    label_feature = raw_datasets[reference].features["label"]
    if getattr(label_feature, "dtype", None) == "list" or label_feature.__class__.__name__ in ("Sequence", "List"):
        fail("multi-label classification (a list-valued label column) is not supported by this script.")
    is_regression = (getattr(label_feature, "dtype", None) in ("float32", "float64")
                     if data_args.do_regression is None else data_args.do_regression)
    if is_regression:
        label_list, num_labels = None, 1
        for split in raw_datasets:
            if raw_datasets[split].features["label"].dtype not in ("float32", "float64"):
                features = raw_datasets[split].features.copy()
                features["label"] = Value("float32")
                raw_datasets[split] = raw_datasets[split].cast(features)
    else:
        names = getattr(label_feature, "names", None)  # a ClassLabel keeps the dataset's own order
        if names:
            label_list = list(names)
        else:
            label_list = set()
            for split in ("train", "validation"):
                if split in raw_datasets:
                    label_list |= {str(label) for label in raw_datasets[split].unique("label")}
            label_list.discard("-1")
            label_list = sorted(label_list)
        num_labels = len(label_list)
        if num_labels <= 1:
            fail(f"the label column {label_column!r} holds {num_labels} distinct value(s): classification needs at "
                 "least two (or pass --do_regression).")

    # --- config, tokenizer, model ---
    common = hub_kwargs(model_args)
    from_scratch = not model_args.model_name_or_path
    label_kwargs = {"num_labels": num_labels}
    if label_list is not None:
        label_kwargs.update(label2id={label: i for i, label in enumerate(label_list)},
                            id2label={i: label for i, label in enumerate(label_list)})
    if model_args.config_name or model_args.model_name_or_path:
        config = from_pretrained(AutoConfig.from_pretrained, model_args.config_name or model_args.model_name_or_path,
                                 "config", finetuning_task="text-classification", **label_kwargs, **common)
    else:
        config = config_with_overrides(CONFIG_MAPPING[model_args.model_type](**label_kwargs),
                                       model_args.config_overrides)
    config.problem_type = "regression" if is_regression else "single_label_classification"
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and data_args.max_seq_length > context:
        how = (f"or raise it with --config_overrides max_position_embeddings={data_args.max_seq_length}"
               if model_args.model_type else "or use a model with a longer context")
        fail(f"--max_seq_length {data_args.max_seq_length} is larger than the model's context of {context} "
             f"positions: use --max_seq_length {context} or less, {how}.")

    if model_args.tokenizer_name or model_args.model_name_or_path:
        tokenizer = from_pretrained(AutoTokenizer.from_pretrained,
                                    model_args.tokenizer_name or model_args.model_name_or_path, "tokenizer",
                                    use_fast=model_args.use_fast_tokenizer, **common)
    else:
        source = raw_datasets["train" if "train" in raw_datasets else "validation"]
        tokenizer = trained_tokenizer(column_texts(source, text_columns),
                                      f"{getattr(source, '_fingerprint', '')}|{','.join(text_columns)}",
                                      model_args.train_tokenizer_vocab_size, context or 512,
                                      hf_lowrank_cache(model_args.cache_dir), training_args)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            fail("the tokenizer has no padding token (and no end-of-text token to pad with): pick another tokenizer.")
        tokenizer.pad_token = tokenizer.eos_token

    if model_args.model_name_or_path:
        model = from_pretrained(AutoModelForSequenceClassification.from_pretrained, model_args.model_name_or_path,
                                "model", config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
                                **common)
    else:
        overridden = overridden_keys(model_args.config_overrides)
        if "vocab_size" not in overridden and hasattr(config, "vocab_size"):
            config.vocab_size = len(tokenizer)
        if "pad_token_id" not in overridden:
            config.pad_token_id = tokenizer.pad_token_id
        model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=model_args.trust_remote_code)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    say(f"model: {type(model).__name__} ({'from a config' if from_scratch else model_args.model_name_or_path}), "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, {num_labels} "
        f"{'output' if is_regression else 'labels'}", training_args)
    model = prepare_lowrank_model(model, lowrank_config)

    # --- preprocessing (datasets.map, cached) ---
    padding = "max_length" if data_args.pad_to_max_length else False
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length)
    label_to_id = None if is_regression else {label: i for i, label in enumerate(label_list)}
    has_names = label_list is not None and bool(getattr(label_feature, "names", None))

    def preprocess_function(examples):
        texts = examples[text_columns[0]]
        for column in text_columns[1:]:
            texts = [a + data_args.text_column_delimiter + b for a, b in zip(texts, examples[column])]
        result = tokenizer([t if isinstance(t, str) else "" for t in texts], padding=padding,
                           max_length=max_seq_length, truncation=True)
        # Written as "labels" (the models' argument): datasets would keep a re-created "label" column's old
        # (string) type.
        if label_to_id is not None and not has_names:
            result["labels"] = [label_to_id.get(str(label), -1) for label in examples["label"]]
        else:
            result["labels"] = examples["label"]
        return result

    with training_args.main_process_first(desc="dataset map pre-processing"):
        processed = raw_datasets.map(preprocess_function, batched=True, num_proc=data_args.preprocessing_num_workers,
                                     remove_columns=raw_datasets[reference].column_names,
                                     load_from_cache_file=not data_args.overwrite_cache,
                                     desc="Running tokenizer on dataset")

    train_dataset = eval_dataset = None
    if training_args.do_train:
        train_dataset = processed["train"]
        if data_args.shuffle_train_dataset:
            train_dataset = train_dataset.shuffle(seed=data_args.shuffle_seed)
        train_dataset = take_samples(train_dataset, data_args.max_train_samples)
    if training_args.do_eval:
        eval_dataset = take_samples(processed["validation"], data_args.max_eval_samples)

    def compute_metrics(p: EvalPrediction):
        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        if is_regression:
            return {"mse": float(np.mean((np.squeeze(preds) - p.label_ids) ** 2))}
        return {"accuracy": float((np.argmax(preds, axis=1) == p.label_ids).mean())}

    if data_args.pad_to_max_length:
        data_collator = default_data_collator
    elif training_args.fp16:
        data_collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)
    else:
        data_collator = None

    trainer = trainer_class(lowrank_config)(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        compute_metrics=compute_metrics, processing_class=tokenizer, data_collator=data_collator,
    )
    card_kwargs = model_card_kwargs(model_args, data_args, training_args, "run_classification.py",
                                    (data_args.train_file, data_args.validation_file))
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
                            "AutoModelForSequenceClassification", train_seconds=train_seconds, trainer=trainer,
                            saved_model=training_args.do_train)
    if training_args.do_train:
        publish_model(model, trainer, training_args, push, card_kwargs)
    return {"metrics": results, "summary": summary, "output_dir": training_args.output_dir, "trainer": trainer}


if __name__ == "__main__":
    main()
