#!/usr/bin/env python
"""Causal language modeling (GPT-2 and other `AutoModelForCausalLM` models) with adaptive low-rank training.

Hugging Face's `run_clm.py` plus the low-rank arguments: pretrain from a config (`--model_type gpt2
--config_overrides ...` or `--config_name`) or continue training (`--model_name_or_path`), on a Hub dataset
(`--dataset_name Salesforce/wikitext --dataset_config_name wikitext-103-raw-v1`) or local files
(`--train_file/--validation_file`, txt/csv/json), with `--lowrank_method oialr|inrank|svd|none` and every
method knob under its `LowRankConfig` name (`--delay_steps`, `--update_every`, `--sigma_cutoff`,
`--init_rank`, ...). Evaluation reports perplexity = exp(eval_loss) (no `evaluate` download).

    python training_scripts/run_clm.py            # the offline demo: small GPT-2 + OIALR on stdlib docstrings
    python training_scripts/run_clm.py --demo --lowrank_method none     # the same run, dense, to compare
    accelerate launch training_scripts/run_clm.py ARGS                  # same arguments, many processes

Additions to the HF script:
- `--train_tokenizer_vocab_size N`: for a model built from a config without `--tokenizer_name`, train a
  byte-level BPE tokenizer of N tokens on the training split (cached; saved with the model). A model built
  from a config gets `vocab_size = len(tokenizer)` unless `--config_overrides` sets `vocab_size`.
- `--use_stdlib_corpus`: train on the docstrings of the installed Python standard library (~1.5 MB train /
  175 KB validation, no download).
- `--text_column_name`: the text column (default: `text`, else the first column, as in the HF script).
- Inputs are checked before anything is trained or written (missing files, unknown columns, a block size
  beyond the model's context, a Hub dataset while offline, an invalid regex, a missing checkpoint): one-line
  errors. The final model, in its smallest use form (`hf_lowrank.save_for_use`), replaces the earlier one in
  `--output_dir` atomically and only after training succeeded; checkpoints keep the training form. `--hub_token`
  is never written (it is kept out of `training_args.bin`).
- `--push_to_hub` uploads with `hf_lowrank.hub.push_to_hub` (weights, tokenizer, and the low-rank model card).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from itertools import chain
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from transformers import (  # noqa: E402
    CONFIG_MAPPING,
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
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
    run_training, save_final_model, say, setup_logging, stdlib_corpus, take_samples, trained_tokenizer,
    trainer_class,
)

MODEL_TYPES = tuple(conf.model_type for conf in MODEL_FOR_CAUSAL_LM_MAPPING.keys())
EXTENSIONS = ("txt", "csv", "json", "jsonl")

# `python run_clm.py` with no arguments (or `--demo ...`): pretrain a small GPT-2 with OIALR on the stdlib
# docstrings, offline, in a few minutes on 2 CPU cores, with the library's default schedule (fractions of the
# run: dense for the first 75% of the optimizer steps, then a basis update every 5% cutting singular values below
# 0.33 of the largest). Compare with the same run dense: `--demo --lowrank_method none`.
DEMO_ARGS = [
    "--model_type", "gpt2",
    "--config_overrides", "n_embd=192,n_layer=4,n_head=4,n_positions=128,resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0",
    "--train_tokenizer_vocab_size", "4096",
    "--block_size", "128",
    "--lowrank_method", "oialr",
    "--output_dir", "outputs/gpt2-oialr-stdlib",
    "--do_train", "--do_eval",
    "--num_train_epochs", "2", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32",
    "--learning_rate", "2e-3", "--lr_scheduler_type", "cosine", "--warmup_steps", "0.05", "--weight_decay", "0.01",
    "--logging_steps", "25", "--save_strategy", "no", "--report_to", "none", "--log_level", "warning",
    "--dataloader_pin_memory", "false", "--seed", "42",
]


@dataclass
class ModelArguments(BaseTextModelArguments):
    """Which model/config/tokenizer to train or fine-tune (as in the HF run_clm.py)."""

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "The model checkpoint for weights initialization. Don't set if you want to train a model "
                  "from scratch."},
    )
    model_type: Optional[str] = model_type_field(MODEL_TYPES)
    config_overrides: Optional[str] = field(
        default=None,
        metadata={"help": "Override some existing default config settings when a model is trained from scratch. "
                  "Example: n_embd=10,resid_pdrop=0.2,scale_attn_weights=false,summary_type=cls_index"},
    )
    train_tokenizer_vocab_size: Optional[int] = field(
        default=None,
        metadata={"help": "Train a byte-level BPE tokenizer of this many tokens on the training split (for a model "
                  "built from a config, when no --tokenizer_name is given). Cached; saved with the model."},
    )
    dtype: Optional[str] = field(
        default=None,
        metadata={"help": "Override the default `torch.dtype` and load the model under this dtype.",
                  "choices": ["auto", "bfloat16", "float16", "float32"]},
    )


@dataclass
class DataTrainingArguments(BaseDataArguments):
    """What data to train and evaluate on (as in the HF run_clm.py, plus the stdlib corpus and a text column)."""

    train_file: Optional[str] = field(default=None, metadata={"help": "The input training data file (a text file)."})
    validation_file: Optional[str] = field(
        default=None,
        metadata={"help": "An optional input evaluation data file to evaluate the perplexity on (a text file)."},
    )
    use_stdlib_corpus: bool = field(
        default=False,
        metadata={"help": "Train/evaluate on the docstrings of the installed Python standard library (offline; "
                  "written once to the hf_lowrank cache)."},
    )
    text_column_name: Optional[str] = field(
        default=None, metadata={"help": "The column holding the text (default: 'text', else the first column)."}
    )
    block_size: Optional[int] = field(
        default=None,
        metadata={"help": "Optional input sequence length after tokenization. The training dataset will be "
                  "truncated in block of this size for training. Default to the model max input length for single "
                  "sentence inputs (take into account special tokens)."},
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Overwrite the cached training and evaluation sets"})
    validation_split_percentage: Optional[int] = field(
        default=5,
        metadata={"help": "The percentage of the train set used as validation set in case there's no validation split"},
    )
    preprocessing_num_workers: Optional[int] = field(
        default=None, metadata={"help": "The number of processes to use for the preprocessing."}
    )
    keep_linebreaks: bool = field(default=True, metadata={"help": "Whether to keep line breaks when using TXT files or not."})


def validate(model_args, data_args, training_args) -> None:
    """Argument combinations, before anything is loaded."""
    check_training_args(training_args)
    check_model_args(model_args, MODEL_TYPES,
                     "no model: pass --model_name_or_path (a checkpoint), or --model_type (e.g. gpt2, with "
                     "--config_overrides) or --config_name to train from scratch.", "is not a causal LM type")
    check_tokenizer_args(model_args, "training data")
    sources = [name for name, given in (("--dataset_name", data_args.dataset_name),
                                        ("--train_file/--validation_file",
                                         data_args.train_file or data_args.validation_file),
                                        ("--use_stdlib_corpus", data_args.use_stdlib_corpus)) if given]
    if not sources:
        fail("no data: pass --dataset_name (a Hub dataset), --train_file/--validation_file (local txt/csv/json), "
             "or --use_stdlib_corpus (offline), or run the script without arguments for the offline demo.")
    if len(sources) > 1:
        fail(f"pick one data source, got {' and '.join(sources)}.")
    check_local_files(train_file=data_args.train_file, validation_file=data_args.validation_file)
    for flag, path in (("train_file", data_args.train_file), ("validation_file", data_args.validation_file)):
        if path is not None and path.rsplit(".", 1)[-1] not in EXTENSIONS:
            fail(f"--{flag} {path!r} should be a {', '.join(EXTENSIONS)} file.")
    if training_args.do_train and data_args.validation_file and not data_args.train_file:
        fail("--do_train needs --train_file (only --validation_file was given).")
    if data_args.block_size is not None and data_args.block_size < 2:
        fail(f"--block_size {data_args.block_size} is too small: use at least 2 tokens.")


def load_raw_datasets(model_args, data_args, training_args):
    if data_args.dataset_name is not None:
        common = dict(cache_dir=model_args.cache_dir, token=model_args.token)
        raw = load_hub_dataset(data_args.dataset_name, data_args.dataset_config_name, **common)
        if "validation" not in raw:
            pct = data_args.validation_split_percentage
            raw["validation"] = load_hub_dataset(data_args.dataset_name, data_args.dataset_config_name,
                                                 split=f"train[:{pct}%]", **common)
            raw["train"] = load_hub_dataset(data_args.dataset_name, data_args.dataset_config_name,
                                            split=f"train[{pct}%:]", **common)
        return raw
    if data_args.use_stdlib_corpus:
        train, validation = stdlib_corpus(hf_lowrank_cache(model_args.cache_dir), training_args)
        data_files = {"train": train, "validation": validation}
    else:
        data_files = {}
        if data_args.train_file is not None:
            data_files["train"] = data_args.train_file
        if data_args.validation_file is not None:
            data_files["validation"] = data_args.validation_file
    first = next(iter(data_files.values()))
    extension = first.rsplit(".", 1)[-1]
    builder, dataset_args = {"txt": "text", "jsonl": "json"}.get(extension, extension), {}
    if builder == "text":
        dataset_args["keep_linebreaks"] = data_args.keep_linebreaks
    raw = load_local_dataset(builder, data_files, cache_dir=model_args.cache_dir, **dataset_args)
    if "validation" not in raw and "train" in raw:
        pct = data_args.validation_split_percentage
        raw["validation"] = load_local_dataset(builder, data_files, split=f"train[:{pct}%]",
                                               cache_dir=model_args.cache_dir, **dataset_args)
        raw["train"] = load_local_dataset(builder, data_files, split=f"train[{pct}%:]",
                                          cache_dir=model_args.cache_dir, **dataset_args)
    return raw


def main(argv: Optional[list[str]] = None) -> dict:
    (model_args, data_args, lowrank_args, training_args), demo = parse_arguments(
        (ModelArguments, DataTrainingArguments, LowRankArguments, TrainingArguments), argv, DEMO_ARGS,
        script="training_scripts/run_clm.py")
    if demo and not (data_args.dataset_name or data_args.train_file or data_args.validation_file):
        data_args.use_stdlib_corpus = True
    setup_logging(training_args)

    # --- everything that can be checked without loading anything ---
    validate(model_args, data_args, training_args)
    lowrank_config = check_lowrank_args(lowrank_args)
    push = check_push(training_args)
    set_seed(training_args.seed)

    # --- data ---
    raw_datasets = load_raw_datasets(model_args, data_args, training_args)
    split = "train" if training_args.do_train else "validation"
    if split not in raw_datasets:
        fail(f"--do_{'train' if split == 'train' else 'eval'} needs a {split} split; the data has "
             f"{list(raw_datasets)}.")
    column_names = list(raw_datasets[split].column_names)
    if data_args.text_column_name is not None:
        check_column(column_names, data_args.text_column_name, "--text_column_name", f"the {split} data")
        text_column_name = data_args.text_column_name
    else:
        text_column_name = "text" if "text" in column_names else column_names[0]

    # --- config ---
    config_kwargs = hub_kwargs(model_args)
    from_scratch = not model_args.model_name_or_path
    if model_args.config_name:
        config = from_pretrained(AutoConfig.from_pretrained, model_args.config_name, "config", **config_kwargs)
    elif model_args.model_name_or_path:
        config = from_pretrained(AutoConfig.from_pretrained, model_args.model_name_or_path, "model config",
                                 **config_kwargs)
    else:
        config = config_with_overrides(CONFIG_MAPPING[model_args.model_type](), model_args.config_overrides)
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if data_args.block_size is not None and context is not None and data_args.block_size > context:
        how = (f"or raise the context with --config_overrides n_positions={data_args.block_size}"
               if from_scratch and model_args.model_type else "or use a model with a longer context")
        fail(f"--block_size {data_args.block_size} is larger than the model's context of {context} positions: "
             f"use --block_size {context} or less, {how}.")

    # --- tokenizer ---
    tokenizer_kwargs = {**hub_kwargs(model_args), "use_fast": model_args.use_fast_tokenizer}
    if model_args.tokenizer_name:
        tokenizer = from_pretrained(AutoTokenizer.from_pretrained, model_args.tokenizer_name, "tokenizer",
                                    **tokenizer_kwargs)
    elif model_args.model_name_or_path:
        tokenizer = from_pretrained(AutoTokenizer.from_pretrained, model_args.model_name_or_path, "tokenizer",
                                    **tokenizer_kwargs)
    else:
        source = raw_datasets["train" if "train" in raw_datasets else "validation"]
        key = f"{getattr(source, '_fingerprint', '')}|{text_column_name}"
        tokenizer = trained_tokenizer(column_texts(source, [text_column_name]), key,
                                      model_args.train_tokenizer_vocab_size, context or 1024,
                                      hf_lowrank_cache(model_args.cache_dir), training_args)

    # --- model ---
    if model_args.model_name_or_path:
        dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
        model = from_pretrained(AutoModelForCausalLM.from_pretrained, model_args.model_name_or_path, "model",
                                config=config, cache_dir=model_args.cache_dir, revision=model_args.model_revision,
                                token=model_args.token, trust_remote_code=model_args.trust_remote_code, dtype=dtype)
    else:
        if "vocab_size" not in overridden_keys(model_args.config_overrides) and hasattr(config, "vocab_size"):
            config.vocab_size = len(tokenizer)  # a from-scratch model gets the tokenizer's vocabulary
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            token_id = getattr(tokenizer, name, None)
            if token_id is not None and name not in overridden_keys(model_args.config_overrides):
                setattr(config, name, token_id)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_args.trust_remote_code)
    embedding_size = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > embedding_size:
        model.resize_token_embeddings(len(tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model: {type(model).__name__} ({'from scratch' if from_scratch else model_args.model_name_or_path}), "
        f"{n_params:,} parameters; tokenizer: {len(tokenizer):,} tokens", training_args)
    model = prepare_lowrank_model(model, lowrank_config)

    # --- tokenize and group into blocks (datasets.map, cached) ---
    if data_args.block_size is None:
        block_size = min(tokenizer.model_max_length, context or 1024, 1024)
    else:
        block_size = data_args.block_size

    def tokenize_function(examples):
        return tokenizer(examples[text_column_name])

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total_length = len(concatenated[next(iter(examples))])
        total_length = (total_length // block_size) * block_size  # drop the remainder of each batch
        result = {k: [t[i:i + block_size] for i in range(0, total_length, block_size)]
                  for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "sequence longer than model_max_length": expected, the text is chunked next
    try:
        with training_args.main_process_first(desc="dataset map tokenization"):
            tokenized = raw_datasets.map(
                tokenize_function, batched=True, num_proc=data_args.preprocessing_num_workers,
                remove_columns=list(raw_datasets[split].column_names),
                load_from_cache_file=not data_args.overwrite_cache, desc="Running tokenizer on dataset")
    finally:
        hf_logging.set_verbosity(verbosity)
    with training_args.main_process_first(desc="grouping texts together"):
        lm_datasets = tokenized.map(
            group_texts, batched=True, num_proc=data_args.preprocessing_num_workers,
            load_from_cache_file=not data_args.overwrite_cache, desc=f"Grouping texts in chunks of {block_size}")

    train_dataset = eval_dataset = None
    if training_args.do_train:
        train_dataset = take_samples(lm_datasets["train"], data_args.max_train_samples)
        if len(train_dataset) == 0:
            fail(f"the training data holds fewer than --block_size {block_size} tokens: use a smaller --block_size "
                 "or more data.")
    if training_args.do_eval:
        if "validation" not in lm_datasets:
            fail("--do_eval needs a validation split: pass --validation_file or a dataset with one.")
        eval_dataset = take_samples(lm_datasets["validation"], data_args.max_eval_samples)
        if len(eval_dataset) == 0:
            fail(f"the validation data holds fewer than --block_size {block_size} tokens: use a smaller "
                 "--block_size or more validation data.")
    say(f"data: {len(train_dataset) if train_dataset is not None else 0:,} training and "
        f"{len(eval_dataset) if eval_dataset is not None else 0:,} evaluation blocks of {block_size} tokens",
        training_args)

    def preprocess_logits_for_metrics(logits, labels):
        if isinstance(logits, tuple):
            logits = logits[0]
        return logits.argmax(dim=-1)

    def compute_metrics(eval_preds):
        preds, labels = eval_preds
        labels = labels[:, 1:].reshape(-1)
        preds = preds[:, :-1].reshape(-1)
        mask = labels != -100
        return {"accuracy": float((preds[mask] == labels[mask]).mean()) if mask.any() else float("nan")}

    trainer = trainer_class(lowrank_config)(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=compute_metrics if training_args.do_eval else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if training_args.do_eval else None,
    )

    card_kwargs = model_card_kwargs(model_args, data_args, training_args, "run_clm.py",
                                    (data_args.train_file, data_args.validation_file),
                                    stdlib=data_args.use_stdlib_corpus)
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
        try:
            metrics["perplexity"] = math.exp(metrics["eval_loss"])
        except OverflowError:
            metrics["perplexity"] = float("inf")
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)

    # What was compressed and what it cost; the model card; the Hub
    summary = print_summary(model, lowrank_config, results, training_args.output_dir, training_args,
                            "AutoModelForCausalLM", train_seconds=train_seconds, trainer=trainer,
                            saved_model=training_args.do_train)
    if training_args.do_train:
        publish_model(model, trainer, training_args, push, card_kwargs)
    return {"metrics": results, "summary": summary, "output_dir": training_args.output_dir, "trainer": trainer}


def _mp_fn(index):  # for xla_spawn (TPUs), as in the HF examples
    main()


if __name__ == "__main__":
    main()
