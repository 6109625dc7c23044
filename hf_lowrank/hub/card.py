"""The model card of a low-rank model: what was compressed, what it cost, how to load it.

Card metadata: `library_name: hf_lowrank`, with `transformers` among the tags. A factorized checkpoint is a
transformers checkpoint that only loads correctly after `import hf_lowrank`; declaring `library_name:
transformers` would make the Hub offer a "Use this model" snippet and widgets that silently build random dense
layers. A model without factorized layers (a dense export) is declared as plain `transformers`.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Optional, Union

from torch import nn

from ..config import LowRankConfig, method_fields
from ..diagnostics.plots import RANK_PLOT_NAME, SPECTRA_PLOT_NAME, STABILITY_PLOT_NAME, plot_layer_ranks, plot_rank_history
from ..history import HISTORY_NAME, load_rank_history
from ..layers import LowRankLinear
from ..registry import method_class, method_names
from ..summary import format_error, lowrank_summary
from ..version import __version__
from .loading import load_pretrained_dir, model_task

TEMPLATE_PATH = Path(__file__).parent.parent / "templates" / "model_card.md"
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
# Keys of the example scripts' results files that are bookkeeping, not evaluation results.
_NOT_METRICS = ("runtime", "per_second", "samples", "flos", "epoch", "steps", "num_input_tokens")


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
    """The config fields that apply to its method (ownership declared in the field metadata), with their help."""
    if config is None:
        return []
    rows = []
    for f in method_fields(config.method):
        value = getattr(config, f.name)
        rows.append({"name": f.name, "value": value if isinstance(value, str) else json.dumps(value),
                     "help": f.metadata.get("help", "").replace("|", "\\|")})  # a bare "|" would split the cell
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


def _error_rows(summary) -> list[dict]:
    """Layers whose factorization from their starting weights was not exact, worst first."""
    inexact = [(name, l.approximation_error) for name, l in summary.layers.items() if l.approximation_error is not None]
    return [{"name": name, "error": format_error(error)} for name, error in sorted(inexact, key=lambda x: -x[1])]


def _history_caption(history: dict, summary) -> str:
    records = sorted(history["history"], key=lambda r: r["step"])
    when = (f"at optimizer step {records[0]['step']} only (no rank change during training)" if len(records) == 1 else
            f"at {len(records)} points between optimizer steps {records[0]['step']} and {records[-1]['step']}")
    return (f"Ranks recorded {when} (from `{HISTORY_NAME}`). Final total rank: {summary.rank_fraction:.1%} of "
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
    method = method if method in method_names() else None

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
        errors = [l.approximation_error for l in summary.layers.values() if l.approximation_error is not None]
        if errors:
            lowrank_meta["max_approximation_error"] = round(max(errors), 6)
    card_data = ModelCardData(
        library_name="hf_lowrank" if factorized else "transformers", tags=card_tags, base_model=base_model,
        datasets=datasets or None, license=license, language=language, pipeline_tag=pipeline_tag,
        model_name=title if evals else None, eval_results=evals, hf_lowrank=lowrank_meta,
    )
    layers, totals = _layer_rows(summary)
    model_id = repo_id or (os.path.basename(os.path.normpath(directory)) if directory else "path/to/model")
    method_title, method_text = (("low-rank factorization", "The training method was not recorded.") if method is None
                                 else (method_class(method).title, method_class(method).card_description))
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
        dense_layers=[{"name": n, "reason": r} for n, r in summary.dense_layers.items()],
        errors=_error_rows(summary),
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
