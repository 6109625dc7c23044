"""Shared plumbing of the training scripts: argument parsing with a built-in demo, input checks that fail with
one clear line before anything is trained or written, data/model loading with readable errors, the low-rank
model and trainer, the final save (the model's use form replaces the earlier one in `output_dir` atomically, only
after training succeeded; checkpoints keep the training form), the printed summary, the model card and the Hub
push.

Errors a user can fix are raised as `SystemExit("error: ...")`: one line on stderr, exit status 1, no traceback.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterable, NoReturn, Optional

import datasets
import transformers
from transformers import HfArgumentParser, Trainer

from hf_lowrank import LowRankTrainer, get_lowrank_model, lowrank_summary, save_for_use
from hf_lowrank.history import HISTORY_NAME
from hf_lowrank.hub.loading import PROCESSOR_PATTERNS, check_weight_files
from hf_lowrank.serialization import CheckpointError
from hf_lowrank.targets import check_patterns
from demo_corpus import train_tokenizer, write_stdlib_corpus

from lowrank_args import METHOD_ARG, ignored_knobs, lowrank_config_from_args

logger = logging.getLogger("hf_lowrank.scripts")

# Text used to train a tokenizer is capped (the first characters of the training split): BPE merges settle
# long before, and a WikiText-103-sized dump would only cost time.
TOKENIZER_TRAIN_CHARS = 50_000_000
_WEIGHT_PREFIXES = ("model.safetensors", "model-", "pytorch_model")
# Files of the earlier model in output_dir that the final save replaces as a whole (with the results describing
# it); anything else there (checkpoints, logs, a README) is kept. `.incomplete-final-model`: an older staging.
_MODEL_FILES = ("config.json", "generation_config.json", "training_args.bin", "trainer_state.json",
                "*_results.json", HISTORY_NAME, ".incomplete-final-model", *PROCESSOR_PATTERNS)


def fail(message: str) -> NoReturn:
    """Stop with a one-line error (no traceback)."""
    raise SystemExit(f"error: {message}")


def say(message: str, training_args=None) -> None:
    """Progress line on the main process."""
    if training_args is None or training_args.process_index == 0:
        print(f"[hf_lowrank] {message}", flush=True)


# --- arguments ----------------------------------------------------------------------------------------------
def model_type_field(model_types: Iterable[str]):
    """`--model_type`, its help listing the script's model types."""
    return field(default=None, metadata={"help": "If training from scratch, pass a model type from the list: "
                                         + ", ".join(model_types)})


@dataclass
class BaseModelArguments:
    """The model arguments of every script (HF example names). A script's `ModelArguments` subclasses this, adds its
    own fields, and overrides `model_type` (and help texts that differ)."""

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Path to pretrained model or model identifier from huggingface.co/models (or build one "
                  "from a config with --model_type / --config_name)."},
    )
    model_type: Optional[str] = field(default=None, metadata={"help": "If training from scratch, pass a model type."})
    config_overrides: Optional[str] = field(
        default=None, metadata={"help": "Override default config settings of --model_type."}
    )
    config_name: Optional[str] = field(
        default=None, metadata={"help": "Pretrained config name or path if not the same as model_name"}
    )
    cache_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Where do you want to store the pretrained models downloaded from huggingface.co"},
    )
    model_revision: str = field(
        default="main",
        metadata={"help": "The specific model version to use (can be a branch name, tag name or commit id)."},
    )
    token: Optional[str] = field(
        default=None,
        metadata={"help": "The token to use as HTTP bearer authorization for remote files. If not specified, will "
                  "use the token generated when running `hf auth login` (stored in `~/.huggingface`)."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Whether to trust the execution of code from datasets/models defined on the Hub."},
    )


@dataclass
class BaseTextModelArguments(BaseModelArguments):
    """Plus the tokenizer (the text scripts)."""

    tokenizer_name: Optional[str] = field(
        default=None, metadata={"help": "Pretrained tokenizer name or path if not the same as model_name"}
    )
    train_tokenizer_vocab_size: Optional[int] = field(
        default=None,
        metadata={"help": "Train a byte-level BPE tokenizer of this many tokens on the training texts (for a model "
                  "built from a config, when no --tokenizer_name is given). Cached; saved with the model."},
    )
    use_fast_tokenizer: bool = field(
        default=True,
        metadata={"help": "Whether to use one of the fast tokenizer (backed by the tokenizers library) or not."},
    )


@dataclass
class BaseDataArguments:
    """The data arguments of every script (HF example names); a script's `DataTrainingArguments` adds its own."""

    dataset_name: Optional[str] = field(
        default=None, metadata={"help": "The name of the dataset to use (via the datasets library)."}
    )
    dataset_config_name: Optional[str] = field(
        default=None, metadata={"help": "The configuration name of the dataset to use (via the datasets library)."}
    )
    max_train_samples: Optional[int] = field(
        default=None,
        metadata={"help": "For debugging purposes or quicker training, truncate the number of training examples to "
                  "this value if set."},
    )
    max_eval_samples: Optional[int] = field(
        default=None,
        metadata={"help": "For debugging purposes or quicker training, truncate the number of evaluation examples "
                  "to this value if set."},
    )


def parse_arguments(dataclass_types, argv: Optional[list[str]], demo_args: Optional[list[str]] = None,
                    script: str = "script.py"):
    """Parse like the HF examples (`--flags`, or a single JSON file). With `demo_args`, no arguments at all, or
    `--demo` anywhere, runs the built-in demo: its arguments come first, so any given ones override them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    use_cpu_if_no_accelerator()
    parser = HfArgumentParser(dataclass_types)
    if len(argv) == 1 and argv[0].endswith(".json"):
        parsed = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
        with open(argv[0]) as f:
            return inrank_mode_for_pretrained(parsed, set(json.load(f))), False
    demo = demo_args is not None and (not argv or "--demo" in argv)
    if demo:
        argv = [a for a in argv if a != "--demo"]
        if os.environ.get("RANK", "0") == "0":
            print(f"[hf_lowrank] running the offline demo, i.e.\n  python {script} " + " ".join(demo_args + argv)
                  + "\n[hf_lowrank] (`--demo ARGS` runs it with ARGS changed; `--help` lists every argument)",
                  flush=True)
        argv = demo_args + argv
    given = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
    return inrank_mode_for_pretrained(parser.parse_args_into_dataclasses(args=argv), given), demo


def inrank_mode_for_pretrained(parsed: tuple, given: set[str]) -> tuple:
    """InRank starting from pretrained weights (`--model_name_or_path`) without `--inrank_mode`: "cumulative"
    (`W = W0 + U Vᵀ`, `U = 0`), which starts exactly at the pretrained function; "efficient" would replace each
    weight by a low-rank approximation of it. A checkpoint trained with InRank continues in its own mode.
    `given`: the argument names the user passed. Returns `parsed`."""
    lowrank = next((a for a in parsed if hasattr(a, METHOD_ARG)), None)
    model = next((a for a in parsed if hasattr(a, "model_name_or_path")), None)
    if (lowrank is None or model is None or getattr(lowrank, METHOD_ARG) != "inrank" or not model.model_name_or_path
            or "inrank_mode" in given):
        return parsed
    from hf_lowrank.serialization import saved_structure

    saved = {}
    if os.path.isfile(os.path.join(model.model_name_or_path, "config.json")):
        saved = saved_structure(model.model_name_or_path).get("lowrank_config") or {}
    lowrank.inrank_mode = saved.get("inrank_mode", "cumulative") if saved.get("method") == "inrank" else "cumulative"
    if os.environ.get("RANK", "0") == "0":
        print(f"[hf_lowrank] InRank from pretrained weights: --inrank_mode {lowrank.inrank_mode} (keeps the "
              "pretrained function; pass --inrank_mode efficient to factorize the weights themselves)", flush=True)
    return parsed


def use_cpu_if_no_accelerator() -> None:
    """One of several processes (`accelerate launch --multi_gpu`, torchrun) on a machine without GPU: make the
    processes one MULTI_CPU (gloo) group. Without it each would train on its own, silently, and all would write
    the same output directory."""
    import torch
    from transformers.utils import strtobool

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or strtobool(os.environ.get("ACCELERATE_USE_CPU", "false")):
        return
    accelerator = getattr(torch, "accelerator", None)
    has_accelerator = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    if not has_accelerator:
        os.environ["ACCELERATE_USE_CPU"] = "true"
        if os.environ.get("RANK", "0") == "0":
            print("[hf_lowrank] several processes and no GPU: training on the CPU as one distributed (gloo) group "
                  "(ACCELERATE_USE_CPU=1)", flush=True)


def setup_logging(training_args) -> None:
    """The HF examples' logging setup."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def check_training_args(training_args) -> None:
    """Something to do; with --do_train, an output directory the final save can swap atomically and a
    --resume_from_checkpoint that is a checkpoint (checked before anything is created)."""
    if not (training_args.do_train or training_args.do_eval):
        fail("nothing to do: pass --do_train and/or --do_eval (as in the Hugging Face example scripts).")
    if not training_args.do_train:
        return
    output_dir = os.path.realpath(training_args.output_dir)
    if os.path.ismount(output_dir):
        fail(f"--output_dir {training_args.output_dir!r} is a mount point: the final model is swapped in by renaming "
             "the folder, which a mount point cannot be. Use a folder inside it.")
    existing = os.path.dirname(output_dir)
    while not os.path.isdir(existing):  # the nearest ancestor that exists is where folders get created
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        fail(f"cannot write beside --output_dir {training_args.output_dir!r}: {existing!r} is not writable (the final "
             "model is staged next to output_dir, then swapped in). Choose an output_dir in a writable folder.")
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is not None:
        if not os.path.isdir(checkpoint):
            problem = "is not a directory" if os.path.exists(checkpoint) else "does not exist"
            fail(f"--resume_from_checkpoint {checkpoint!r} {problem}: pass a checkpoint-N folder written by an "
                 "earlier run (inside its --output_dir).")
        if not os.path.isfile(os.path.join(checkpoint, "trainer_state.json")):
            fail(f"--resume_from_checkpoint {checkpoint!r} is not a Trainer checkpoint (no trainer_state.json): pass a "
                 "checkpoint-N folder written by an earlier run (inside its --output_dir).")


def check_model_args(model_args, model_types: Iterable[str], no_model: str, what: str) -> None:
    """--config_overrides only with --model_type; some model given (else fail with `no_model`); a --model_type the
    script can build (`what`: e.g. "is not a causal LM type")."""
    if model_args.config_overrides is not None and (model_args.config_name or model_args.model_name_or_path):
        fail("--config_overrides can't be used in combination with --config_name or --model_name_or_path "
             "(it overrides the defaults of --model_type).")
    if not (model_args.model_name_or_path or model_args.config_name or model_args.model_type):
        fail(no_model)
    if model_args.model_type is not None and model_args.model_type not in model_types:
        fail(f"--model_type {model_args.model_type!r} {what}; choose one of {', '.join(model_types)}.")
    if model_args.model_name_or_path and os.path.isdir(model_args.model_name_or_path):
        try:  # a truncated download or copy: say so now, not after the data is loaded
            check_weight_files(model_args.model_name_or_path)
        except ValueError as error:
            fail(f"--model_name_or_path {model_args.model_name_or_path!r}: {error}")


def check_tokenizer_args(model_args, texts: str) -> None:
    """A tokenizer from --tokenizer_name / --model_name_or_path, or one trained on the `texts`."""
    if model_args.train_tokenizer_vocab_size and (model_args.tokenizer_name or model_args.model_name_or_path):
        logger.warning("--train_tokenizer_vocab_size is ignored: the tokenizer comes from %s.",
                       model_args.tokenizer_name or model_args.model_name_or_path)
    if not (model_args.tokenizer_name or model_args.model_name_or_path or model_args.train_tokenizer_vocab_size):
        fail("no tokenizer for a model built from a config: pass --tokenizer_name (a local tokenizer directory or a "
             f"Hub id) or --train_tokenizer_vocab_size N to train one on the {texts}.")


def check_lowrank_args(lowrank_args):
    """The `LowRankConfig` of the arguments (None for `--lowrank_method none`); invalid values fail here."""
    try:
        config = lowrank_config_from_args(lowrank_args)
        if config is not None:
            check_patterns(config)  # a bad regex now, not after the data and tokenizer are loaded
    except ValueError as error:
        fail(f"invalid low-rank argument: {error}")
    ignored = ignored_knobs(lowrank_args)
    if ignored:
        logger.warning("%s do not apply to --%s %s and are ignored.", ", ".join(ignored), METHOD_ARG,
                       getattr(lowrank_args, METHOD_ARG))
    return config


def check_local_files(**paths: Optional[str]) -> None:
    """Each given `--name path` must exist."""
    for name, path in paths.items():
        if path is not None and not os.path.exists(path):
            fail(f"--{name} {path!r} does not exist (working directory {os.getcwd()!r}): fix the path, or use "
                 "--dataset_name for a Hub dataset.")


def check_push(training_args) -> Optional[dict]:
    """With --push_to_hub: check now (before training) that pushing can work, and take the push over from the
    Trainer (whose own push would replace our model card). Returns the push settings or None.

    `--hub_token` is taken out of `training_args` in any case (kept only in the push settings): the Trainer
    pickles its arguments into `training_args.bin` beside the model and in every checkpoint."""
    token, training_args.hub_token = training_args.hub_token, None
    if not training_args.push_to_hub:
        return None
    import hf_lowrank

    push = getattr(hf_lowrank, "push_to_hub", None)
    if push is None:
        fail("--push_to_hub needs hf_lowrank.push_to_hub, which this version of hf_lowrank does not have; drop "
             "--push_to_hub and upload the output directory yourself.")
    from huggingface_hub import constants

    if constants.is_offline_mode():
        fail("--push_to_hub while the Hub is in offline mode (HF_HUB_OFFLINE=1): unset it (and be online), or "
             "drop --push_to_hub and push later with `hf-lowrank push OUTPUT_DIR REPO_ID`.")
    settings = {"repo_id": training_args.hub_model_id or os.path.basename(os.path.normpath(training_args.output_dir)),
                "token": token, "private": training_args.hub_private_repo,
                "revision": training_args.hub_revision, "push": push}
    training_args.push_to_hub = False
    return settings


# --- loading ------------------------------------------------------------------------------------------------
def _offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode() or datasets.config.HF_HUB_OFFLINE


def load_hub_dataset(name: str, config_name: Optional[str] = None, local_hint: str = "--train_file/--validation_file",
                     **kwargs):
    """`datasets.load_dataset(name, config_name, ...)` with a one-line error when it cannot be had."""
    try:
        return datasets.load_dataset(name, config_name, **kwargs)
    except ConnectionError as error:
        why = "the Hub is in offline mode (HF_HUB_OFFLINE=1)" if _offline() else "the Hub cannot be reached"
        fail(f"cannot load dataset {name!r}: {why} and it is not in the local cache. Connect to the network "
             f"(and unset HF_HUB_OFFLINE) to download it once, or use local files ({local_hint}). "
             f"[{type(error).__name__}]")
    except (FileNotFoundError, ValueError) as error:
        fail(f"cannot load dataset {name!r}{f' ({config_name})' if config_name else ''}: "
             f"{str(error).splitlines()[0] if str(error) else type(error).__name__}")


def load_local_dataset(builder: str, data_files: dict, **kwargs):
    try:
        return datasets.load_dataset(builder, data_files=data_files, **kwargs)
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetGenerationError) as error:
        cause = error.__cause__ or error
        first = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        fail(f"cannot read {', '.join(data_files.values())} as {builder}: {first}")


def from_pretrained(loader, name: str, what: str, **kwargs):
    """`loader(name, **kwargs)` (a `from_pretrained`) with a one-line error for a missing/unreachable model."""
    try:
        return loader(name, **kwargs)
    except (OSError, ValueError) as error:
        if os.path.isdir(name) or os.path.isfile(name):
            fail(f"cannot load the {what} from {name!r}: {str(error).splitlines()[0]}")
        why = ("the Hub is in offline mode (HF_HUB_OFFLINE=1)" if _offline() else
               "it is neither a local directory nor reachable on the Hub")
        fail(f"cannot load the {what} {name!r}: {why}. Pass a local directory (saved with save_pretrained), "
             "connect to the network once to cache it, or build the model from a config (--model_type).")


def hub_kwargs(model_args) -> dict:
    """The `from_pretrained` keyword arguments every script passes (cache, revision, token, remote code)."""
    return {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token,
            "trust_remote_code": model_args.trust_remote_code}


def take_samples(dataset, max_samples: Optional[int], shuffle_seed: Optional[int] = None):
    """The first `max_samples` examples of `dataset` (all of them for None), after a shuffle with `shuffle_seed`
    when one is given (--max_train_samples / --max_eval_samples)."""
    if max_samples is None:
        return dataset
    if shuffle_seed is not None:
        dataset = dataset.shuffle(seed=shuffle_seed)
    return dataset.select(range(min(len(dataset), max_samples)))


def check_column(dataset_columns: Iterable[str], column: str, flag: str, source: str) -> None:
    columns = list(dataset_columns)
    if column not in columns:
        fail(f"{flag} {column!r} is not a column of {source}; its columns are {columns}. Pass one of them.")


def hf_lowrank_cache(cache_dir: Optional[str]) -> str:
    """Where the scripts cache what they build (stdlib corpus, trained tokenizers)."""
    if cache_dir:
        return os.path.join(cache_dir, "hf_lowrank")
    return os.environ.get("HF_LOWRANK_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hf_lowrank"))


def stdlib_corpus(cache_root: str, training_args) -> tuple[str, str]:
    """`train.txt` / `validation.txt` of the standard-library docstring corpus, written once and cached."""
    version = f"py{sys.version_info.major}.{sys.version_info.minor}"
    directory = os.path.join(cache_root, f"stdlib_corpus_{version}")
    train, validation = os.path.join(directory, "train.txt"), os.path.join(directory, "validation.txt")
    with training_args.main_process_first(desc="stdlib corpus"):
        if not (os.path.isfile(train) and os.path.isfile(validation)):
            say("writing the standard-library docstring corpus (once; cached in "
                f"{directory})", training_args)
            os.makedirs(cache_root, exist_ok=True)
            staging = tempfile.mkdtemp(prefix=".stdlib_corpus-", dir=cache_root)
            write_stdlib_corpus(staging)
            shutil.rmtree(directory, ignore_errors=True)
            os.replace(staging, directory)
    return train, validation


def trained_tokenizer(texts, key: str, vocab_size: int, model_max_length: int, cache_root: str, training_args):
    """A byte-level BPE tokenizer (demo_corpus.train_tokenizer) trained on the `texts` iterable, cached by
    `key`: the main process trains it, the others load the same one."""
    from transformers import AutoTokenizer

    digest = hashlib.sha1(f"{key}|{vocab_size}".encode()).hexdigest()[:16]
    directory = os.path.join(cache_root, "tokenizers", f"bpe{vocab_size}-{digest}")
    with training_args.main_process_first(desc="tokenizer training"):
        if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
            say(f"training a {vocab_size}-token BPE tokenizer on the training text", training_args)
            os.makedirs(os.path.dirname(directory), exist_ok=True)
            staging = tempfile.mkdtemp(prefix=".bpe-", dir=os.path.dirname(directory))
            text_file = os.path.join(staging, "text.txt")
            size = 0
            with open(text_file, "w", encoding="utf-8") as f:
                for text in texts:
                    if text:
                        text = text if text.endswith("\n") else text + "\n"
                        f.write(text)
                        size += len(text)
                        if size >= TOKENIZER_TRAIN_CHARS:
                            break
            if size == 0:
                fail("the training text is empty: cannot train a tokenizer on it.")
            tokenizer = train_tokenizer([text_file], vocab_size=vocab_size)
            os.remove(text_file)
            tokenizer.save_pretrained(staging)
            shutil.rmtree(directory, ignore_errors=True)
            os.replace(staging, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.model_max_length = model_max_length
    return tokenizer


def column_texts(dataset, columns: list[str]) -> Iterable[str]:
    """Texts of `columns` of a `datasets.Dataset`, in batches (never the whole column in memory)."""
    for batch in dataset.iter(batch_size=1000):
        for column in columns:
            for value in batch[column]:
                if isinstance(value, str):
                    yield value


def config_with_overrides(config, overrides: Optional[str]):
    """`config.update_from_string(overrides)` with a readable error."""
    if overrides:
        try:
            config.update_from_string(overrides)
        except ValueError as error:
            fail(f"--config_overrides {overrides!r}: {error}")
    return config


def overridden_keys(overrides: Optional[str]) -> set[str]:
    return {item.split("=", 1)[0].strip() for item in (overrides or "").split(",") if "=" in item}


# --- model and trainer --------------------------------------------------------------------------------------
def prepare_lowrank_model(model, lowrank_config):
    """`get_lowrank_model(model, config)` (a no-op for `--lowrank_method none`) with readable errors.

    A checkpoint that is already low-rank (loaded factorized) keeps its factors: with the same method, training
    continues under the command line's schedule; with `none`, its factors train as ordinary parameters."""
    existing = getattr(model, "lowrank_config", None)
    if existing is not None and lowrank_config is not None:
        if existing.method != lowrank_config.method:
            fail(f"the checkpoint was trained with --{METHOD_ARG} {existing.method}; continue with that method (or "
                 f"--{METHOD_ARG} none), or start from its dense export (`hf-lowrank merge DIR OUT`).")
        model.lowrank_config = lowrank_config
        return model
    if lowrank_config is None:
        return model
    try:
        return get_lowrank_model(model, lowrank_config)
    except ImportError as error:
        fail(f"--{METHOD_ARG} {lowrank_config.method} is not available in this version of hf_lowrank ({error}).")
    except ValueError as error:
        fail(f"cannot apply the low-rank arguments to {type(model).__name__}: {error}")


def trainer_class(lowrank_config):
    """`LowRankTrainer` when a low-rank method is chosen, the plain `Trainer` for `--lowrank_method none`."""
    return Trainer if lowrank_config is None else LowRankTrainer


def total_optimizer_steps(training_args, num_examples: int) -> int:
    if training_args.max_steps and training_args.max_steps > 0:
        return training_args.max_steps
    batch = training_args.per_device_train_batch_size * max(1, training_args.world_size)
    batches = math.ceil(num_examples / batch) if not training_args.dataloader_drop_last else num_examples // batch
    per_epoch = max(1, batches // training_args.gradient_accumulation_steps)
    return math.ceil(training_args.num_train_epochs * per_epoch)


def describe_schedule(lowrank_config, training_args, num_examples: int) -> None:
    """Say when the rank changes will happen; warn when the run is too short for them."""
    if lowrank_config is None or not training_args.do_train:
        return
    from hf_lowrank.methods import get_method

    text, warning = get_method(lowrank_config).describe(total_optimizer_steps(training_args, num_examples))
    say(text, training_args)
    if warning:
        logger.warning(warning)


def save_final_model(trainer, output_dir: str) -> None:
    """Save the trained model into `output_dir` in its smallest form for use (`hf_lowrank.save_for_use`; the
    checkpoints keep the training form), with the tokenizer/processor, `lowrank_history.json` (low-rank runs) and
    `training_args.bin` beside it.

    Atomic: a kill at any moment leaves `output_dir` holding either the earlier model or the new one, complete.
    The new model is written to a staging folder beside `output_dir` (same parent, so same file system);
    everything else in `output_dir` (checkpoints, logs, a README) is hard-linked into it (no data is copied,
    except where hard links are not supported), the files of the earlier model and the results describing it
    are not (`_MODEL_FILES`); then one `renameat2(RENAME_EXCHANGE)` swaps the two folders and the old one is
    deleted. A staging folder left by a kill is removed at the next save. Where the exchange does not exist (not
    Linux), two renames are used: a kill between them leaves no `output_dir`, the earlier model complete in
    `.NAME.hf_lowrank-old-*` and the new one in `.NAME.hf_lowrank-new`, both next to it.
    """
    target = os.path.realpath(output_dir)
    parent, name = os.path.split(target)
    staging = os.path.join(parent, f".{name}.hf_lowrank-new")
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)  # an earlier save killed midway
        os.makedirs(staging)
        _write_final_model(trainer, staging)
        if os.path.isdir(target):
            _carry_over(target, staging)
            if _exchange(staging, target):
                shutil.rmtree(staging)  # now the earlier folder; what was kept is linked into the new one
            else:
                old = tempfile.mkdtemp(prefix=f".{name}.hf_lowrank-old-", dir=parent)
                os.rmdir(old)
                os.rename(target, old)
                os.rename(staging, target)
                shutil.rmtree(old)
        else:
            os.rename(staging, target)
    trainer.accelerator.wait_for_everyone()


def _write_final_model(trainer, directory: str) -> None:
    """The files of the final model: use form, processing class, rank history, training arguments."""
    import torch
    from transformers.trainer import TRAINING_ARGS_NAME

    save_for_use(trainer.model, directory)
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(directory)
    if isinstance(trainer, LowRankTrainer):
        trainer.lowrank.save_history(directory)
    torch.save(trainer.args, os.path.join(directory, TRAINING_ARGS_NAME))  # as Trainer.save_model; no token in it


def _is_model_file(name: str) -> bool:
    return name.startswith(_WEIGHT_PREFIXES) or any(fnmatch.fnmatch(name, pattern) for pattern in _MODEL_FILES)


def _carry_over(source: str, target: str) -> None:
    """Hard-link into `target` what `source` holds besides a model (see `_MODEL_FILES`) and `target` does not
    have: checkpoints, logs, a README. Symlinks are recreated as symlinks, never followed."""
    for name in os.listdir(source):
        src, dst = os.path.join(source, name), os.path.join(target, name)
        if _is_model_file(name) or os.path.lexists(dst):
            continue
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:  # a file system without hard links (or a mount inside output_dir): copy this file
        shutil.copy2(src, dst, follow_symlinks=False)


def _exchange(first: str, second: str) -> bool:
    """Swap two paths atomically (Linux `renameat2(..., RENAME_EXCHANGE)`); False where not available."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # a C library without it
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # an old kernel, or a file system without it
        return False
    raise OSError(code, os.strerror(code), first, None, second)


def write_model_card(model, output_dir: str, trainer, **card_kwargs) -> Optional[str]:
    """The hf_lowrank model card (README.md + plots) when `hf_lowrank.hub` is available, else the Trainer's."""
    if not trainer.args.should_save:
        return None
    try:
        from hf_lowrank.hub import save_model_card
    except ImportError:
        save_model_card = None
    if save_model_card is not None:
        try:
            return save_model_card(model, output_dir, source_dir=output_dir,
                                   **{k: v for k, v in card_kwargs.items() if v is not None})
        except FileExistsError as error:  # a hand-written README is kept
            logger.warning("%s", error)
            return None
    trainer.create_model_card(model_name=os.path.basename(os.path.normpath(output_dir)))
    return os.path.join(output_dir, "README.md")


def push_model(push: Optional[dict], output_dir: str, training_args, **card_kwargs) -> None:
    if push is None or not training_args.should_save:
        return
    repo_id = push["repo_id"]
    if "/" not in repo_id:  # a bare name goes to the token owner's namespace, as with the Trainer
        from huggingface_hub import HfApi

        repo_id = HfApi().create_repo(repo_id, token=push["token"], private=push["private"], exist_ok=True).repo_id
    say(f"pushing {output_dir} to the Hub as {repo_id}", training_args)
    info = push["push"](output_dir, repo_id, token=push["token"], private=push["private"],
                        revision=push["revision"], **{k: v for k, v in card_kwargs.items() if v is not None})
    say(f"pushed: {getattr(info, 'commit_url', None) or push['repo_id']}", training_args)


def _fmt(n: int) -> str:
    return f"{n:,}"


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _method_title(name: Optional[str], default: str) -> str:
    from hf_lowrank.methods import method_class, method_names

    return method_class(name).title if name in method_names() else default




def print_summary(model, lowrank_config, metrics: dict, output_dir: str, training_args, auto_class: str,
                  train_seconds: Optional[float] = None, trainer=None, saved_model: bool = True) -> str:
    """Print (main process) the dense-vs-compressed summary, metrics included; returns the text."""
    summary = lowrank_summary(model)
    if lowrank_config is not None:
        method = _method_title(lowrank_config.method, lowrank_config.method)
    elif summary.layers:  # a factorized checkpoint used with --lowrank_method none
        loaded = getattr(getattr(model, "lowrank_config", None), "method", None)
        method = f"{_method_title(loaded, 'low-rank')} checkpoint, no rank schedule in this run"
    else:
        method = "dense (no low-rank method)"
    saved = summary.dense_params - summary.params
    dense_total = summary.model_params + saved
    rows = [("", "dense", f"low-rank ({method})" if lowrank_config is not None else "this model")]
    if lowrank_config is None and summary.layers:
        rows = [("", "dense", "low-rank")]
    if summary.layers:
        full = sum(l.max_rank for l in summary.layers.values())
        held = sum(l.rank for l in summary.layers.values())
        rows += [
            (f"factorized layers ({len(summary.layers)}): parameters", _fmt(summary.dense_params),
             f"{_fmt(summary.params)} ({summary.compression:.1%})"),
            ("factorized layers: total rank", _fmt(full), f"{_fmt(held)} ({summary.rank_fraction:.1%})"),
        ]
    elif lowrank_config is not None:
        rows.append(("factorized layers", "-", "none (the schedule never factorized a layer)"))
    if lowrank_config is None and not summary.layers:
        rows = [("", "", "dense model"), ("model parameters", "", _fmt(summary.model_params))]
    else:
        rows.append(("model parameters", _fmt(dense_total),
                     f"{_fmt(summary.model_params)} ({summary.model_params / dense_total:.1%})"))
    rows.append(("trainable parameters now", "", _fmt(summary.trainable_params)))
    for key in ("perplexity", "eval_loss", "eval_accuracy"):
        if key in metrics:
            value = metrics[key]
            rows.append((key.replace("eval_", "eval ") if key != "perplexity" else "eval perplexity", "",
                         f"{value:.4f}" if key != "perplexity" else f"{value:.2f}"))
    if train_seconds is not None:
        rows.append(("training time", "", _duration(train_seconds)))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    rule = sum(width) + 6
    lines = ["", "=" * rule, f"hf_lowrank summary: {type(model).__name__}, {method}", "-" * rule]
    lines += [f"{r[0]:<{width[0]}}   {r[1]:>{width[1]}}   {r[2]:>{width[2]}}" for r in rows]
    history = getattr(getattr(trainer, "lowrank", None), "history", None) or []
    changes = [h for h in history if h.get("event") not in (None, "start")]
    if changes:
        def frac(h):  # over the layers factorized at that step, as the training log's lowrank/rank_fraction
            full = sum(summary.layers[n].max_rank for n in h["ranks"] if n in summary.layers) or 1
            return sum(h["ranks"].values()) / full

        lines.append("rank changes: " + ", ".join(f"step {h['step']} {h['event']} → {frac(h):.0%}" for h in changes))
    if summary.layers or summary.dense_layers:
        lines += ["-" * rule, "per-layer ranks:", str(summary)]
    if saved_model:
        lines += ["-" * rule, f"model saved to {output_dir}",
                  f"reload: import hf_lowrank; from transformers import {auto_class}; "
                  f"{auto_class}.from_pretrained({output_dir!r})"]
    lines.append("=" * rule)
    text = "\n".join(lines)
    if training_args.process_index == 0:
        print(text, flush=True)
    return text


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def describe_data(dataset_name=None, dataset_config_name=None, files=(), stdlib=False) -> str:
    if stdlib:
        return "the docstrings of the installed Python standard library (the offline demo corpus)"
    if dataset_name:
        return f"`{dataset_name}`" + (f" (`{dataset_config_name}`)" if dataset_config_name else "")
    return "local files " + ", ".join(f"`{os.path.basename(str(f))}`" for f in files if f)


def model_card_kwargs(model_args, data_args, training_args, script: str, files=(), stdlib=False) -> dict:
    """What the model card says about the run: base model, data, and which script trained it."""
    data = describe_data(data_args.dataset_name, data_args.dataset_config_name, files, stdlib=stdlib)
    return {"base_model": model_args.model_name_or_path, "datasets": data_args.dataset_name,
            "dataset_config": data_args.dataset_config_name,
            "dataset_split": "validation" if training_args.do_eval else None,
            "description": f"Trained with `training_scripts/{script}` of hf_lowrank on {data}."}


def run_training(trainer, lowrank_config, training_args, num_train_samples: int):
    """`trainer.train` with the schedule described first and the run timed: `(train_result, seconds)`. A checkpoint
    that cannot be resumed (incomplete, another architecture) fails with one line before the first step."""
    describe_schedule(lowrank_config, training_args, num_train_samples)
    with Timer() as timer:
        try:
            train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        except CheckpointError as error:
            fail(f"cannot resume from --resume_from_checkpoint {training_args.resume_from_checkpoint!r}: {error}")
    return train_result, timer.seconds


def publish_model(model, trainer, training_args, push: Optional[dict], card_kwargs: dict) -> None:
    """Write the model card into `output_dir` and push the folder when `--push_to_hub` was given."""
    output_dir = training_args.output_dir
    card_kwargs = {"model_name": os.path.basename(os.path.normpath(output_dir)), **card_kwargs}
    repo_id = (push or {}).get("repo_id") or training_args.hub_model_id or output_dir
    card = write_model_card(model, output_dir, trainer, repo_id=repo_id, **card_kwargs)
    if card:
        say(f"model card: {card}", training_args)
    push_model(push, output_dir, training_args, **card_kwargs)
