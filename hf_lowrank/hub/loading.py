"""Loading a model directory (shared by the CLI and the hub code): which class, which task, which processor files."""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
import stat
from typing import Optional, Union

from torch import nn

logger = logging.getLogger(__name__)

# Tokenizer / processor files that sit beside a saved model (save_pretrained of the processing class).
PROCESSOR_PATTERNS = (
    "tokenizer*", "vocab.*", "merges.txt", "special_tokens_map.json", "added_tokens.json", "*.model",
    "spiece.model", "preprocessor_config.json", "*processor_config.json", "chat_template*",
)
# (auto-mapping in transformers.models.auto.modeling_auto, Auto class, Hub pipeline tag)
_TASKS = (
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM", "text-generation"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForSequenceClassification", "text-classification"),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForImageClassification", "image-classification"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "AutoModelForTokenClassification", "token-classification"),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "AutoModelForQuestionAnswering", "question-answering"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM", "fill-mask"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM", "text2text-generation"),
)


class NotAModelError(ValueError):
    """A directory that does not hold a model saved with `save_pretrained`."""


# --- loading a saved directory -----------------------------------------------------------------------

def load_pretrained_dir(path: Union[str, os.PathLike], **kwargs) -> nn.Module:
    """Load the model saved in `path` with the class its `config.json` names (`architectures[0]`).

    Factorized models come back factorized (this package is imported). Raises `NotAModelError` with the
    reason when `path` is not a saved model.
    """
    import transformers
    from transformers import AutoConfig

    path = str(path)
    if not os.path.exists(path):
        raise NotAModelError(f"{path!r} does not exist.")
    if not os.path.isdir(path):
        raise NotAModelError(f"{path!r} is not a directory: pass the directory that save_pretrained wrote.")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise NotAModelError(f"{path!r} is not a saved model: it has no config.json (pass the directory that "
                             "model.save_pretrained or trainer.save_model wrote).")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as err:  # a config.json of something else (a tokenizer's...)
        raise NotAModelError(f"{path!r} is not a saved model: its config.json cannot be read as a model "
                             f"configuration ({err}).") from None
    architecture = (getattr(config, "architectures", None) or [None])[0]
    if architecture is None:
        raise NotAModelError(f"{path!r}: config.json names no model class ('architectures' is empty), so the "
                             "model head is unknown. Save the model with save_pretrained.")
    model_class = getattr(transformers, architecture, None)
    if model_class is None:
        raise NotAModelError(f"{path!r}: transformers {transformers.__version__} has no class {architecture!r} "
                             "(custom code models are not supported).")
    if not any(name.endswith((".safetensors", ".bin")) for name in os.listdir(path)):
        raise NotAModelError(f"{path!r} has a config.json but no weights file (*.safetensors).")
    check_weight_files(path)
    return model_class.from_pretrained(path, **kwargs)


def check_weight_files(path: Union[str, os.PathLike]) -> None:
    """Raise a `ValueError` naming the file when a `*.safetensors` file in directory `path` is truncated or
    corrupt (reads only the headers). A dense model would otherwise fail with a bare `SafetensorError`."""
    from ..serialization import weight_file_shapes

    path = str(path)
    weight_file_shapes(sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith(".safetensors")))


def model_task(model_or_arch: Union[nn.Module, str]) -> tuple[str, Optional[str]]:
    """`(Auto class name, Hub pipeline tag)` for a model or architecture name; `("AutoModel", None)` if unknown."""
    from transformers.models.auto import modeling_auto

    arch = model_or_arch if isinstance(model_or_arch, str) else type(model_or_arch).__name__
    for mapping, auto_class, tag in _TASKS:
        if arch in getattr(modeling_auto, mapping, {}).values():
            return auto_class, tag
    return "AutoModel", None


def is_regular_file(path: Union[str, os.PathLike]) -> bool:
    """A regular file itself, not a symlink (which could point anywhere, e.g. to `~/.ssh/id_rsa`) nor a device."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def copy_processor_files(source: Union[str, os.PathLike], target: Union[str, os.PathLike]) -> list[str]:
    """Copy the tokenizer / processor files found in `source` into `target`; returns the copied names.

    Only regular files directly inside `source` are copied; symlinks are skipped with a warning, never followed,
    so a link to a file elsewhere (say `~/.ssh/id_rsa`) is not uploaded or exported with the model.
    """
    copied = []
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        if not any(fnmatch.fnmatch(name, p) for p in PROCESSOR_PATTERNS):
            continue
        if is_regular_file(path):
            shutil.copy2(path, os.path.join(target, name), follow_symlinks=False)
            copied.append(name)
        elif os.path.islink(path):
            logger.warning("Not copying %s: it is a symlink (to %s), and links are never followed. Put the file "
                           "itself there to include it.", path, os.readlink(path))
    return copied
