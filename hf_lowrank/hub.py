"""Model cards and Hub upload for low-rank models.

`PreTrainedModel.push_to_hub` writes a generic card over README.md (it loads the remote or default card and
saves it over the one in its temporary folder), so a card we wrote would never survive it. `push_to_hub` here
does the upload itself: `save_pretrained` into a temporary folder, our card and plots beside the weights, then
`HfApi.create_repo(exist_ok=True)` and one `HfApi.upload_folder` commit.

Card metadata: `library_name: hf_lowrank`, with `transformers` among the tags. A factorized checkpoint is a
transformers checkpoint that only loads correctly after `import hf_lowrank`; declaring `library_name:
transformers` would make the Hub offer a "Use this model" snippet and widgets that silently build random dense
layers. A model without factorized layers (a dense export) is declared as plain `transformers`.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Optional, Union

from torch import nn

from .config import METHODS, LowRankConfig
from .diagnostics import (HISTORY_NAME, RANK_PLOT_NAME, SPECTRA_PLOT_NAME, STABILITY_PLOT_NAME,
                          load_rank_history, plot_layer_ranks, plot_rank_history)
from .layers import LowRankLinear
from .serialization import sync_quantization_config
from .summary import lowrank_summary

logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"
CARD_NAME = "README.md"
CARD_MARKER = "<!-- hf_lowrank:model-card -->"
HISTORY_PLOT_NAME = "lowrank_rank_history.png"
LAYER_PLOT_NAME = "lowrank_layer_ranks.png"
RESULT_FILES = ("all_results.json", "eval_results.json")  # written by the HF example scripts
# Plots of `LowRankDiagnosticsCallback` that the card links when they are in the model directory.
DIAGNOSTIC_PLOTS = (
    (RANK_PLOT_NAME, "Diagnostics: ranks", "Rank of the watched layers at each diagnostics check."),
    (STABILITY_PLOT_NAME, "Diagnostics: basis stability",
     "OIALR's basis stability: cosine similarity of each layer's polar factor `U Vᵀ` between checks."),
    (SPECTRA_PLOT_NAME, "Diagnostics: singular values",
     "Singular values of each layer at the end of training, relative to the largest."),
)
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
_METHOD_PREFIX = {"oialr": "OIALR:", "inrank": "InRank:", "svd": "svd:"}
_METHOD_TEXT = {
    "oialr": ("OIALR", "**OIALR** (orthogonality-informed adaptive low-rank training, Coquelin et al., "
              "arXiv:2401.08505): the layers train at full rank for a warm-up, are then converted to `U Σ Vᵀ` with "
              "frozen orthogonal bases `U`, `V` and a small trainable `Σ`; every few optimizer steps `Σ` is "
              "re-diagonalized, the bases rotated, and singular values below a fraction of the largest cut, so "
              "the rank only shrinks."),
    "inrank": ("InRank", "**InRank** (incremental low-rank learning, Zhao et al., arXiv:2306.11250): each layer "
               "(or its cumulative update) is `U Vᵀ` at a small rank plus a buffer of extra components; at every "
               "check the rank grows to what an explained-variance threshold τ of the update's spectrum asks for; "
               "after a set step the rank is frozen and the buffer dropped."),
    "svd": ("one-shot SVD", "**One-shot SVD**: each layer's weight was truncated to its leading singular "
            "components (`U Vᵀ`, the singular values folded into both factors), then trained as factors."),
}
# Keys of the example scripts' results files that are bookkeeping, not evaluation results.
_NOT_METRICS = ("runtime", "per_second", "samples", "flos", "epoch", "steps", "num_input_tokens")


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
    except Exception as err:  # a config.json of something else (tokenizer, dataset, ...)
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
    return model_class.from_pretrained(path, **kwargs)


def model_task(model_or_arch: Union[nn.Module, str]) -> tuple[str, Optional[str]]:
    """`(Auto class name, Hub pipeline tag)` for a model or architecture name; `("AutoModel", None)` if unknown."""
    from transformers.models.auto import modeling_auto

    arch = model_or_arch if isinstance(model_or_arch, str) else type(model_or_arch).__name__
    for mapping, auto_class, tag in _TASKS:
        if arch in getattr(modeling_auto, mapping, {}).values():
            return auto_class, tag
    return "AutoModel", None


def copy_processor_files(source: Union[str, os.PathLike], target: Union[str, os.PathLike]) -> list[str]:
    """Copy the tokenizer / processor files found in `source` into `target`; returns the copied names."""
    copied = []
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        if os.path.isfile(path) and any(fnmatch.fnmatch(name, p) for p in PROCESSOR_PATTERNS):
            shutil.copy2(path, os.path.join(target, name))
            copied.append(name)
    return copied


# --- card contents -----------------------------------------------------------------------------------

def read_eval_results(directory: Optional[Union[str, os.PathLike]]) -> dict:
    """Evaluation metrics from `all_results.json` / `eval_results.json` in `directory` (the HF example scripts
    write them); training figures and bookkeeping (runtime, samples per second, epoch, ...) are left out."""
    results = {}
    if directory is None:
        return results
    for name in RESULT_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path) as f:
                data = json.load(f)
            results.update({k: v for k, v in data.items() if _is_metric(k, v)})
    return results


def _is_metric(key: str, value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return not key.startswith(("train_", "total_")) and not any(part in key for part in _NOT_METRICS)


def _metric_type(key: str) -> str:
    return key[len("eval_"):] if key.startswith("eval_") else key


def _format_metric(value) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000


def _method_settings(config: Optional[LowRankConfig]) -> list[dict]:
    """The config fields that apply to its method, with their help text (from the dataclass metadata)."""
    if config is None:
        return []
    prefix = _METHOD_PREFIX[config.method]
    rows = []
    for f in fields(config):
        help_text = f.metadata.get("help", "")
        owner = next((p for p in _METHOD_PREFIX.values() if help_text.startswith(p)), None)
        if owner not in (None, prefix):
            continue
        value = getattr(config, f.name)
        help_text = help_text[len(owner):].strip() if owner else help_text
        rows.append({"name": f.name, "value": value if isinstance(value, str) else json.dumps(value),
                     "help": help_text.replace("|", "\\|")})  # a bare "|" would split the table cell
    return rows


def _size_rows(model: nn.Module, summary) -> list[dict]:
    stored_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    factor = next((m.U for m in model.modules() if isinstance(m, LowRankLinear)), None)
    saved = summary.dense_params - summary.params
    rows = [{"label": "parameters (whole model)", "before": f"{summary.model_params + saved:,}",
             "after": f"{summary.model_params:,}"}]
    if summary.layers:
        full = sum(layer.max_rank for layer in summary.layers.values())
        held = sum(layer.rank for layer in summary.layers.values())
        rows += [
            {"label": "parameters of the factorized layers", "before": f"{summary.dense_params:,}",
             "after": f"{summary.params:,} ({summary.compression:.1%})"},
            {"label": "total rank of the factorized layers", "before": f"{full:,}",
             "after": f"{held:,} ({summary.rank_fraction:.1%})"},
        ]
    extra = saved * factor.element_size() if factor is not None else 0
    rows.append({"label": "size of the parameters", "before": _format_bytes(stored_bytes + extra),
                 "after": _format_bytes(stored_bytes)})
    return rows


def _layer_rows(summary) -> tuple[list[dict], dict]:
    rows = [{"name": name, "shape": f"{l.in_features} → {l.out_features}", "rank": l.rank, "max_rank": l.max_rank,
             "params": f"{l.params:,}", "dense_params": f"{l.dense_params:,}",
             "ratio": f"{l.params / l.dense_params:.1%}" if l.dense_params else "–"}
            for name, l in summary.layers.items()]
    totals = {"rank": sum(l.rank for l in summary.layers.values()),
              "max_rank": sum(l.max_rank for l in summary.layers.values()),
              "params": f"{summary.params:,}", "dense_params": f"{summary.dense_params:,}",
              "ratio": f"{summary.compression:.1%}"}
    return rows, totals


def _history_caption(history: dict, summary) -> str:
    records = sorted(history["history"], key=lambda r: r["step"])
    return (f"Ranks recorded at {len(records)} points between optimizer steps {records[0]['step']} and "
            f"{records[-1]['step']} (from `{HISTORY_NAME}`). Final total rank: {summary.rank_fraction:.1%} of "
            "full rank.")


def _plots(summary, history: Optional[dict], output_dir: Optional[str]) -> list[dict]:
    """Write the card's plots into `output_dir` and describe them (only plots that exist are linked)."""
    if output_dir is None:
        return []
    plots = []
    if history is not None and history.get("history"):
        max_ranks = {name: layer.max_rank for name, layer in summary.layers.items()}
        plot_rank_history(history, os.path.join(output_dir, HISTORY_PLOT_NAME), max_ranks=max_ranks)
        plots.append({"heading": "Rank over training", "path": HISTORY_PLOT_NAME, "alt": "rank over training",
                      "caption": _history_caption(history, summary)})
    elif summary.layers:
        plot_layer_ranks(summary, os.path.join(output_dir, LAYER_PLOT_NAME))
        plots.append({"heading": "Final ranks", "path": LAYER_PLOT_NAME, "alt": "final rank of each layer",
                      "caption": f"No rank history (`{HISTORY_NAME}`) was recorded for this model; the plot shows "
                                 "the rank each layer ended with."})
    for name, heading, caption in DIAGNOSTIC_PLOTS:
        if os.path.isfile(os.path.join(output_dir, name)):
            plots.append({"heading": heading, "path": name, "alt": heading, "caption": caption})
    return plots


def _as_list(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def make_model_card(
    model_or_dir: Union[nn.Module, str, os.PathLike],
    *,
    output_dir: Optional[Union[str, os.PathLike]] = None,
    source_dir: Optional[Union[str, os.PathLike]] = None,
    repo_id: Optional[str] = None,
    model_name: Optional[str] = None,
    description: Optional[str] = None,
    base_model: Optional[str] = None,
    datasets: Optional[Union[str, list[str]]] = None,
    dataset_name: Optional[str] = None,
    dataset_config: Optional[str] = None,
    dataset_split: Optional[str] = None,
    eval_results: Optional[dict] = None,
    history=None,
    license: Optional[str] = None,
    language: Optional[Union[str, list[str]]] = None,
    tags: Optional[list[str]] = None,
):
    """Build the model card (a `huggingface_hub.ModelCard`) of a low-rank model.

    Args:
        model_or_dir: the model, or a directory it was saved in (loaded with its `architectures` class).
        output_dir: where the card's plots are written (PNG, linked relatively); without it the card has no
            plots. Defaults to the directory when `model_or_dir` is one.
        source_dir: where to read `lowrank_history.json` and `all_results.json` / `eval_results.json`.
            Defaults to the directory when `model_or_dir` is one.
        repo_id: the Hub repository, shown in the loading snippet.
        model_name: title of the card and name in `model-index` (default: repo or directory name).
        description: free text placed under the title.
        base_model, datasets, license, language, tags: Hub metadata (`datasets` are Hub dataset ids).
        dataset_name, dataset_config, dataset_split: describe the evaluation set in `model-index`
            (the first of `datasets` is the evaluated dataset).
        eval_results: metrics such as `{"eval_loss": 3.2, "perplexity": 24.5}`; they override the values read
            from the results files. They enter `model-index` when a dataset is given.
        history: a rank history (dict, JSON file or directory); default: `lowrank_history.json` in `source_dir`.

    The numbers in the card are those of `lowrank_summary(model)`.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from . import __version__

    directory = None
    if isinstance(model_or_dir, (str, os.PathLike)):
        directory = str(model_or_dir)
        model = load_pretrained_dir(directory)
    else:
        model = model_or_dir
    output_dir = str(output_dir) if output_dir is not None else directory
    source_dir = str(source_dir) if source_dir is not None else directory
    summary = lowrank_summary(model)
    factorized = bool(summary.layers)
    history = load_rank_history(history if history is not None else source_dir)
    config = getattr(model, "lowrank_config", None)
    if config is None and history is not None and history.get("config"):
        config = LowRankConfig.from_dict(history["config"])
    method = config.method if config is not None else (history or {}).get("method")
    method = method if method in METHODS else None

    results = {**read_eval_results(source_dir), **(eval_results or {})}
    results = {k: v for k, v in results.items() if _is_metric(k, v)}
    auto_class, pipeline_tag = model_task(model)
    datasets = _as_list(datasets)
    title = model_name or (repo_id.split("/")[-1] if repo_id else None) or (
        os.path.basename(os.path.normpath(directory)) if directory else
        f"{type(model).__name__}{' (low-rank)' if factorized else ''}")
    evals = None
    if results and datasets:
        evals = [EvalResult(task_type=pipeline_tag or "other", dataset_type=datasets[0],
                            dataset_name=dataset_name or datasets[0], dataset_config=dataset_config,
                            dataset_split=dataset_split, metric_type=_metric_type(k), metric_name=k,
                            metric_value=v) for k, v in results.items()]
    card_tags = ["hf_lowrank", "transformers"] + (["low-rank", method] if factorized and method else
                                                  ["low-rank"] if factorized else [])
    card_tags += [t for t in _as_list(tags) if t not in card_tags]
    lowrank_meta = None
    if factorized:
        lowrank_meta = {"method": method, "factorized_layers": len(summary.layers), "params": summary.params,
                        "dense_params": summary.dense_params, "compression": round(summary.compression, 6),
                        "rank_fraction": round(summary.rank_fraction, 6), "version": __version__}
    card_data = ModelCardData(
        library_name="hf_lowrank" if factorized else "transformers", tags=card_tags, base_model=base_model,
        datasets=datasets or None, license=license, language=language, pipeline_tag=pipeline_tag,
        model_name=title if evals else None, eval_results=evals, hf_lowrank=lowrank_meta,
    )
    layers, totals = _layer_rows(summary)
    model_id = repo_id or (os.path.basename(os.path.normpath(directory)) if directory else "path/to/model")
    method_title, method_text = _METHOD_TEXT.get(
        method, ("low-rank factorization", "The training method was not recorded."))
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        marker=CARD_MARKER,
        title=title,
        description=description,
        factorized=factorized,
        model_id=model_id,
        auto_class=auto_class,
        method_title=method_title,
        method_description=method_text,
        settings=_method_settings(config),
        compression={"layer_before": f"{summary.dense_params:,}", "layer_after": f"{summary.params:,}",
                     "ratio": f"{summary.compression:.1%}", "rank_fraction": f"{summary.rank_fraction:.1%}"},
        size_rows=_size_rows(model, summary),
        layers=layers,
        totals=totals,
        plots=_plots(summary, history, output_dir),
        results=[{"name": k, "value": _format_metric(v)} for k, v in results.items()],
        version=__version__,
    )
    # The template's optional sections leave runs of blank lines behind; collapse them.
    return ModelCard(re.sub(r"\n{3,}", "\n\n", card.content))


def is_replaceable_card(path: Union[str, os.PathLike]) -> bool:
    """Whether the README at `path` was generated (by us or by `Trainer.create_model_card`), so that
    regenerating it loses nothing written by hand."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return CARD_MARKER in text or "generated_from_trainer" in text


def save_model_card(model_or_dir: Union[nn.Module, str, os.PathLike],
                    output_dir: Optional[Union[str, os.PathLike]] = None, *, overwrite: bool = False,
                    **card_kwargs) -> str:
    """Write the model card as `README.md` (and its plots) into `output_dir` (default: the model directory).

    An existing README.md generated by hf_lowrank or by the Trainer is refreshed; a hand-written one is kept
    and a `FileExistsError` raised unless `overwrite=True`. Returns the README path. `card_kwargs` are those
    of `make_model_card`.
    """
    if output_dir is None:
        if not isinstance(model_or_dir, (str, os.PathLike)):
            raise ValueError("save_model_card(model) needs output_dir: where to write README.md and the plots.")
        output_dir = model_or_dir
    output_dir = str(output_dir)
    path = os.path.join(output_dir, CARD_NAME)
    if os.path.isfile(path) and not overwrite and not is_replaceable_card(path):
        raise FileExistsError(f"{path} exists and was not generated by hf_lowrank or the Trainer; it is kept. "
                              "Pass overwrite=True (CLI: --overwrite) to replace it.")
    os.makedirs(output_dir, exist_ok=True)
    card = make_model_card(model_or_dir, output_dir=output_dir, **card_kwargs)
    card.save(path)
    return path


# --- push --------------------------------------------------------------------------------------------

OFFLINE_MESSAGE = ("The Hugging Face Hub is in offline mode (HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1): nothing "
                   "was uploaded. Unset it to push, or keep the model local with model.save_pretrained(DIR) and "
                   "hf_lowrank.hub.save_model_card(DIR).")


def _check_online() -> None:
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    if constants.is_offline_mode():
        raise OfflineModeIsEnabled(OFFLINE_MESSAGE)


def push_to_hub(
    model: Union[nn.Module, str, os.PathLike],
    repo_id: str,
    *,
    processing_class=None,
    token: Optional[str] = None,
    private: Optional[bool] = None,
    commit_message: Optional[str] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    api=None,
    **card_kwargs,
):
    """Upload a low-rank model to the Hub with its model card, in one commit.

    The weights and config (`save_pretrained`), the tokenizer or processor, `lowrank_history.json` when known,
    the card (`README.md`, see `make_model_card`) and its plots are staged in a temporary folder, then
    `api.create_repo(repo_id, exist_ok=True)` and `api.upload_folder(...)`. Unlike `model.push_to_hub`, no
    generic card replaces ours.

    Args:
        model: the model, or a directory it was saved in (then its processor files, rank history, results
            and diagnostics plots are taken from there too).
        repo_id: `"user/name"`.
        processing_class: a tokenizer / processor (saved with its `save_pretrained`), or a directory whose
            tokenizer / processor files are copied.
        token: Hub token (default: the logged-in one). Used only for the two API calls; never logged or
            written into the card.
        private, commit_message, revision, create_pr: as in `HfApi.upload_folder` / `create_repo`.
        api: an `HfApi` (default `HfApi()`); inject one to point elsewhere or to test.
        card_kwargs: passed to `make_model_card` (`base_model`, `datasets`, `eval_results`, `source_dir`, ...).

    Returns the `CommitInfo` of the upload. Raises `huggingface_hub.errors.OfflineModeIsEnabled` before
    anything is written or sent when offline mode is set.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    _check_online()
    if isinstance(model, (str, os.PathLike)):
        directory = str(model)
        model = load_pretrained_dir(directory)
        processing_class = directory if processing_class is None else processing_class
        card_kwargs.setdefault("source_dir", directory)
    api = api if api is not None else HfApi()
    source_dir = card_kwargs.get("source_dir")
    with tempfile.TemporaryDirectory(prefix="hf_lowrank_push_") as staging:
        if any(isinstance(m, LowRankLinear) for m in model.modules()):
            sync_quantization_config(model)  # config.json must carry the ranks the model holds now
        model.save_pretrained(staging)
        if isinstance(processing_class, (str, os.PathLike)):
            copy_processor_files(processing_class, staging)
        elif processing_class is not None:
            processing_class.save_pretrained(staging)
        history = load_rank_history(card_kwargs.pop("history", None) or source_dir)
        if history is not None:
            with open(os.path.join(staging, HISTORY_NAME), "w") as f:
                json.dump(history, f)
        if source_dir is not None:
            for name, _, _ in DIAGNOSTIC_PLOTS:
                if os.path.isfile(os.path.join(source_dir, name)):
                    shutil.copy2(os.path.join(source_dir, name), staging)
        card = make_model_card(model, output_dir=staging, repo_id=repo_id, history=history, **card_kwargs)
        card.save(os.path.join(staging, CARD_NAME))
        staged = sorted(os.listdir(staging))
        try:
            api.create_repo(repo_id, token=token, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=staging, token=token, revision=revision,
                                     create_pr=create_pr,
                                     commit_message=commit_message or "Upload low-rank model (hf_lowrank)")
        except OfflineModeIsEnabled as err:
            raise OfflineModeIsEnabled(OFFLINE_MESSAGE) from err
    logger.info("Uploaded %s to %s", ", ".join(staged), repo_id)
    return info
