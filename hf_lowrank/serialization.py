"""Saving and loading factorized models through plain `save_pretrained` / `AutoModel*.from_pretrained`.

`import hf_lowrank` registers the `hf_lowrank` quantization method with transformers. A factorized model's
`config.json` then carries `quantization_config = {"quant_method": "hf_lowrank", "rank_pattern": {...}}`,
and on load the quantizer rebuilds the factorized modules (on the meta device) before the weights load.
Safetensors only: loading never unpickles.

Two forms are written. The training form keeps what trains apart (OIALR's `Σ`); Trainer checkpoints use it,
so a resume continues exactly. The use form (`to_use_form`, `save_for_use`, the scripts' final save, pushes,
`hf-lowrank export`) is the smallest: `Σ` folded into the bases (`r·(in+out)` plus bias), and every layer
whose factors would not be smaller than its dense weight merged back to dense. Both reload; merge works
from both.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from typing import Optional, Union

import torch
from torch import nn
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .config import LowRankConfig
from .layers import (DENSE_LAYERS_ATTR, FACTOR_NAMES, LowRankLinear, break_even_rank, build_lowrank_linear,
                     linear_shape)
from .linalg import svd_f32
from .registry import method_names
from .targets import FACTORIZABLE, replace_module
from .version import __version__

QUANT_METHOD = "hf_lowrank"
# Attribute of a model: layer name -> relative error ‖W − W'‖_F / ‖W‖_F of its factorization from the weights it had
# when `get_lowrank_model` factorized it (only layers where that was not exact); recorded in config.json.
APPROXIMATION_ERRORS_ATTR = "lowrank_approximation_errors"


@register_quantization_config(QUANT_METHOD)
class LowRankQuantizationConfig(QuantizationConfigMixin):
    """What `config.json` records about a factorized model.

    Args:
        rank_pattern: module name → rank held now.
        sigma_layers: module names that hold a separate `S` (r×r) factor.
        base_layers: module names that hold a frozen dense `base` (W = W0 + U Vᵀ, cumulative InRank).
        trainable: module name → factors that train (`"U"`, `"S"`, `"V"`).
        lowrank_config: the `LowRankConfig` used for training, as a dict.
        dense_layers: target layers held dense because factorizing them would not be smaller, with the reason.
        approximation_errors: module name → relative error of its factorization from the starting weights
            (layers where it was not exact).
    """

    def __init__(self, rank_pattern: Optional[dict] = None, sigma_layers: Optional[list] = None,
                 base_layers: Optional[list] = None, trainable: Optional[dict] = None, lowrank_config: Optional[dict] = None,
                 hf_lowrank_version: Optional[str] = None, dense_layers: Optional[dict] = None,
                 approximation_errors: Optional[dict] = None, **kwargs):
        self.quant_method = QUANT_METHOD
        _check_structure(rank_pattern, sigma_layers, base_layers, trainable)
        self.rank_pattern = dict(rank_pattern or {})
        self.sigma_layers = sorted(sigma_layers or [])
        self.base_layers = sorted(base_layers or [])
        self.trainable = dict(trainable or {})
        self.lowrank_config = dict(lowrank_config or {})
        self.dense_layers = dict(dense_layers or {})
        self.approximation_errors = dict(approximation_errors or {})
        self.hf_lowrank_version = hf_lowrank_version or __version__

    @classmethod
    def from_model(cls, model: nn.Module) -> "LowRankQuantizationConfig":
        layers = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
        config = getattr(model, "lowrank_config", None)
        return cls(
            rank_pattern={n: m.rank for n, m in layers.items()},
            sigma_layers=[n for n, m in layers.items() if m.S is not None],
            base_layers=[n for n, m in layers.items() if m.base is not None],
            trainable={n: m.trainable_factors() for n, m in layers.items()},
            lowrank_config=config.to_dict() if config is not None else {},
            dense_layers=dict(getattr(model, DENSE_LAYERS_ATTR, None) or {}),
            approximation_errors={n: e for n, e in (getattr(model, APPROXIMATION_ERRORS_ATTR, None) or {}).items()
                                  if n in layers},
        )


def _check_structure(rank_pattern, sigma_layers, base_layers, trainable) -> None:
    """Fail with a `ValueError` naming the field when a saved structure (config.json's quantization_config, or
    lowrank_structure.json) does not have the types hf_lowrank writes: a hand-edited or damaged file would
    otherwise fail later with an AttributeError or TypeError that names nothing."""
    fix = "Re-save the model with save_pretrained, or fix quantization_config in its config.json."
    if rank_pattern is not None and not isinstance(rank_pattern, dict):
        raise ValueError(f"quantization_config.rank_pattern must be a dict {{layer name: rank}}, got a "
                         f"{type(rank_pattern).__name__}: {rank_pattern!r}. {fix}")
    for name, rank in (rank_pattern or {}).items():
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"quantization_config.rank_pattern[{name!r}] is {rank!r} ({type(rank).__name__}): a "
                             f"rank must be a whole number ≥ 0, e.g. 16. {fix}")
    for field, value in (("sigma_layers", sigma_layers), ("base_layers", base_layers)):
        if value is not None and (not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value)):
            raise ValueError(f"quantization_config.{field} must be a list of layer names, got {value!r}. {fix}")
    if trainable is not None and (not isinstance(trainable, dict) or not all(
            isinstance(v, (list, tuple)) and set(v) <= set(FACTOR_NAMES) for v in trainable.values())):
        raise ValueError(f"quantization_config.trainable must map layer names to factor lists such as "
                         f"['U', 'V'], got {trainable!r}. {fix}")
    for field, value in (("sigma_layers", sigma_layers), ("base_layers", base_layers), ("trainable", trainable)):
        unknown = sorted(set(value or ()) - set(rank_pattern or {}))
        if unknown:
            raise ValueError(f"quantization_config.{field} names {unknown}, which rank_pattern does not list as "
                             f"factorized layers. {fix}")


def sync_quantization_config(model: nn.Module) -> None:
    """Record the model's current ranks in `model.config` so `save_pretrained` (and every Trainer
    checkpoint) writes them; a model with no factorized layer left is saved as a plain dense model.
    Plain `nn.Module`s (no transformers config) have nothing to record."""
    if getattr(model, "config", None) is None:
        return
    if not any(isinstance(m, LowRankLinear) for m in model.modules()):
        remove_quantization_config(model)
        return
    quant = LowRankQuantizationConfig.from_model(model)
    model.config.quantization_config = quant
    model.hf_quantizer = LowRankHfQuantizer(quant, pre_quantized=True)
    # transformers refuses `.float()`/`.half()` on "quantized" models; ours are ordinary float modules.
    model.is_quantized = False


def remove_quantization_config(model: nn.Module) -> None:
    if getattr(model, "config", None) is None:
        return
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed into this model: missing, incomplete, unreadable, or saved from
    another architecture. The message names the checkpoint, the problem and the fix."""


def weight_file_shapes(files) -> dict[str, tuple]:
    """Tensor name → shape from the headers of safetensors `files` (no tensor is read).

    Raises a `ValueError` naming the file when it is not safetensors, or is truncated or corrupt (an
    interrupted copy or download): transformers would raise a bare `SafetensorError` that names neither.
    """
    from safetensors import SafetensorError, safe_open

    shapes = {}
    for path in files or []:
        if not str(path).endswith(".safetensors"):
            raise ValueError(f"hf_lowrank models load from safetensors only; found {path}.")
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except SafetensorError as err:
            raise ValueError(f"{path} is truncated or corrupt ({err}): it was not completely written, copied or "
                             "downloaded. Save, copy or download the model again.") from None
    return shapes


def _runtime_names(model: nn.Module, saved_keys) -> dict[str, str]:
    """Map saved tensor names to the model's runtime names. transformers 5 renames some modules on load
    (ViT: `encoder.layer.N.attention.attention.query` → `layers.N.attention.q_proj`); use its own mapping."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        meta = model.state_dict()
        prefix = getattr(model, "base_model_prefix", None)
        return {key: rename_source_key(key, renamings, converters, prefix, meta)[0] for key in saved_keys}
    except (ImportError, AttributeError, TypeError, KeyError):  # internals moved: fall back to the names as saved
        return {key: key for key in saved_keys}


def _check_saved_shapes(model: nn.Module, checkpoint_files) -> None:
    """Fail clearly when the weights file does not hold every tensor of every factorized layer (factors,
    bias, `base`) at the shape config.json's ranks give. transformers would leave a missing tensor of a module
    it did not build itself as uninitialized memory (NaN logits) with only a load-report line."""
    shapes = weight_file_shapes(checkpoint_files)
    if not shapes:
        return
    saved = {runtime: shapes[key] for key, runtime in _runtime_names(model, shapes).items()}
    for name, module in model.named_modules():
        if not isinstance(module, LowRankLinear):
            continue
        for tensor, param in module.named_parameters(recurse=False):
            expected = tuple(param.shape)
            found = saved.get(f"{name}.{tensor}")
            if found is None:
                raise ValueError(f"config.json says {name} is factorized at rank {module.rank}, but the weights "
                                 f"file holds no {tensor!r} tensor for it ({name}.{tensor}): the directory is "
                                 "inconsistent (a tensor was removed, or the weights come from another save). "
                                 "Save the model again with save_pretrained.")
            if found != expected:
                raise ValueError(f"config.json records rank {module.rank} for {name}, so {tensor} should be "
                                 f"{expected}, but the weights file holds {found}. The directory is "
                                 "inconsistent (config.json edited, or weights from another run).")


def _saved_layer(model: nn.Module, name: str, rank: int, source: str, error=ValueError) -> nn.Module:
    """The linear layer `name` of `model` that a saved structure (`source`, e.g. "config.json") factorizes at
    `rank`; raises `error` naming the layer when the model has no such linear layer or the rank cannot fit."""
    kind = type(model).__name__
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise error(f"{source} records a factorized layer {name!r} that this {kind} does not have: it was saved "
                    "from a different architecture (other layers or sizes, or another transformers version). Use "
                    "the model class and configuration it was saved with.") from None
    if not isinstance(module, FACTORIZABLE):
        raise error(f"{source} records {name!r} as a factorized linear layer, but in this {kind} it is a "
                    f"{type(module).__name__}: the structure was edited or belongs to another model. Use the "
                    "model it was saved with, or re-save it.")
    n_in, n_out = linear_shape(module)
    if not 0 <= rank <= min(n_in, n_out):
        raise error(f"{source} records rank {rank} for {name!r}, outside [0, {min(n_in, n_out)}] for this "
                    f"{kind}'s {n_in}→{n_out} layer: it was saved from a different architecture. Use the model "
                    "configuration it was saved with.")
    return module


def check_checkpoint_fits(model: nn.Module, path: str) -> None:
    """Raise a `CheckpointError` when the model weights saved in checkpoint `path` do not fit `model` (given
    the checkpoint's ranks first, `restructure_like_checkpoint`): tensors the model lacks or holds at other
    shapes, or model tensors the checkpoint lacks. Resuming into another architecture would otherwise fail
    inside the optimizer load, or leave layers silently at their initial values. Safetensors checkpoints only;
    others are left to the Trainer."""
    files = sorted(os.path.join(path, name) for name in os.listdir(path)
                   if name == "model.safetensors" or (name.startswith("model-") and name.endswith(".safetensors")))
    try:
        shapes = weight_file_shapes(files)
    except ValueError as err:
        raise CheckpointError(f"cannot resume from {path}: {err}") from None
    if not shapes:
        return
    saved = {runtime: shapes[key] for key, runtime in _runtime_names(model, shapes).items()}
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # saved once, under the tied source
    problems = [f"{key}: checkpoint {saved[key]}, model {expected[key]}"
                for key in sorted(saved.keys() & expected.keys()) if saved[key] != expected[key]]
    problems += [f"{key}: only in the checkpoint" for key in sorted(saved.keys() - expected.keys())]
    problems += [f"{key}: not in the checkpoint" for key in sorted(expected.keys() - saved.keys() - tied)]
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise CheckpointError(f"checkpoint {path} was saved from a different architecture than this "
                              f"{type(model).__name__} ({len(problems)} tensors differ: {shown}). Resume with the "
                              "model configuration of the run that wrote it, or start a new run.")


@register_quantizer(QUANT_METHOD)
class LowRankHfQuantizer(HfQuantizer):
    """Rebuilds factorized modules before transformers loads the weights."""

    requires_calibration = False

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        cfg = self.quantization_config
        for name, rank in cfg.rank_pattern.items():
            module = _saved_layer(model, name, rank, "config.json")
            layer = build_lowrank_linear(module, rank, has_sigma=name in cfg.sigma_layers,
                                         has_base=name in cfg.base_layers, trainable=cfg.trainable.get(name))
            replace_module(model, name, layer)
        _check_saved_shapes(model, checkpoint_files)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        # Loading replaces parameters with fresh, trainable ones: re-freeze the factors that were frozen
        # (OIALR's bases), or continued training would move them.
        for name, factors in self.quantization_config.trainable.items():
            model.get_submodule(name).set_trainable(factors)
        saved_config = self.quantization_config.lowrank_config
        if saved_config and getattr(model, "lowrank_config", None) is None:
            if saved_config.get("method") in method_names():
                model.lowrank_config = LowRankConfig.from_dict(saved_config)
            else:  # the weights are all there; only continued training needs the method
                warnings.warn(f"This model was trained with method {saved_config.get('method')!r}, which is not "
                              "registered in this process: it loads and runs, but to continue training it, import the "
                              "module that registers that method before loading.")
        setattr(model, DENSE_LAYERS_ATTR, dict(self.quantization_config.dense_layers))
        setattr(model, APPROXIMATION_ERRORS_ATTR, dict(self.quantization_config.approximation_errors))
        model.is_quantized = False
        return model

    def _dequantize(self, model, dtype=None):
        return _merge_layers(model)

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True


def _merge_layers(model: nn.Module) -> nn.Module:
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            replace_module(model, name, module.to_dense())
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every factorized layer by its dense equivalent; the model then saves and loads anywhere,
    without this package (no `quantization_config` is left in its config)."""
    _merge_layers(model)
    remove_quantization_config(model)
    for attr in ("lowrank_config", DENSE_LAYERS_ATTR, APPROXIMATION_ERRORS_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def use_form_layer(layer: LowRankLinear) -> nn.Module:
    """The smallest form of one layer for use: `U Vᵀ` with `Σ` folded evenly into both bases (balanced, from
    the SVD of `Σ`), or the dense layer when the factors would not store less than the dense weight (a
    cumulative InRank layer `W0 + U Vᵀ` is always merged). Computes the same function up to rounding."""
    if layer.base is not None or layer.rank > break_even_rank(layer.in_features, layer.out_features, False):
        return layer.to_dense()
    if layer.S is None:
        return layer
    decomposition = svd_f32(layer.S)
    if decomposition is None:  # a non-finite Σ: fold it plainly, the values are what they are
        U, V = layer.U.detach().float() @ layer.S.detach().float(), layer.V.detach().float()
    else:
        p, s, qh = decomposition
        root = s.sqrt()
        U, V = layer.U.detach().float() @ p * root, layer.V.detach().float() @ qh.t() * root
    folded = build_lowrank_linear(layer, layer.rank, has_sigma=False, trainable=("U", "V"))
    folded.set_factors(U, None, V)
    if layer.bias is not None:
        folded.bias.data.copy_(layer.bias.detach())
    return folded.train(layer.training)


def to_use_form(model: nn.Module) -> nn.Module:
    """Convert `model` in place to its smallest form for use (see `use_form_layer`) and return it.

    Every factorized layer then stores at most its dense size, and `r·(in+out)` plus bias where `Σ` was held
    for training. Reload with `AutoModelFor*.from_pretrained` as usual; `merge_and_unload` works on it too.
    Training checkpoints keep the training form: use this for what you ship, not to resume a run.
    """
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, LowRankLinear):
                replace_module(model, name, use_form_layer(module))
    sync_quantization_config(model)
    return model


def save_for_use(model: nn.Module, save_directory: Union[str, os.PathLike], **save_kwargs) -> str:
    """Save a use-form copy of `model` (see `to_use_form`) with `save_pretrained`; `model` itself is unchanged.

    Args:
        model: a model prepared by `get_lowrank_model` or loaded factorized.
        save_directory: where `save_pretrained` writes.
        save_kwargs: passed to `save_pretrained`.
    """
    export = to_use_form(copy.deepcopy(model))
    export.save_pretrained(save_directory, **save_kwargs)
    return str(save_directory)


STRUCTURE_NAME = "lowrank_structure.json"


def saved_structure(path: str) -> dict:
    """The factorized structure recorded in `path`: a saved model's `config.json` or the controller's
    `lowrank_structure.json` (written beside `accelerator.save_state` checkpoints). Empty when dense."""
    structure_path = os.path.join(path, STRUCTURE_NAME)
    if os.path.isfile(structure_path):
        return _read_json(structure_path)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path} holds neither config.json nor {STRUCTURE_NAME}: not a checkpoint.")
    quant = _read_json(config_path).get("quantization_config") or {}
    return quant if quant.get("quant_method") == QUANT_METHOD else {}


def _read_json(path: str) -> dict:
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path} is not valid JSON ({err}): the checkpoint was not completely written "
                                  "or was edited. Resume from another checkpoint.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object: it is not a checkpoint's structure.")
    return data


def restructure_like_checkpoint(model: nn.Module, path: str) -> bool:
    """Give `model` the factorized structure saved in `path`, before its weights and optimizer load.

    Used when resuming: a model built dense (or at other ranks) gets the checkpoint's layers and shapes.
    For a raw `accelerate` loop call it before creating the optimizer and `accelerator.prepare`.
    Returns True if anything changed. Raises a `CheckpointError` naming the layer when the checkpoint was
    saved from another architecture (a layer this model lacks, is not linear, or is too small for the rank);
    `check_checkpoint_fits` then compares every tensor.
    """
    quant = saved_structure(path)
    if quant.get("quant_method") != QUANT_METHOD:
        return False
    try:
        cfg = LowRankQuantizationConfig(**{k: v for k, v in quant.items() if k != "quant_method"})
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None
    changed = False
    for name, rank in cfg.rank_pattern.items():
        module = _saved_layer(model, name, rank, f"checkpoint {path}", error=CheckpointError)
        has_sigma, has_base = name in cfg.sigma_layers, name in cfg.base_layers
        if (isinstance(module, LowRankLinear) and module.rank == rank and (module.S is not None) == has_sigma
                and (module.base is not None) == has_base):
            module.set_trainable(cfg.trainable.get(name, module.trainable_factors()))
            continue
        layer = build_lowrank_linear(module, rank, has_sigma=has_sigma, has_base=has_base,
                                     trainable=cfg.trainable.get(name))
        replace_module(model, name, layer)
        changed = True
    setattr(model, DENSE_LAYERS_ATTR, dict(cfg.dense_layers))
    setattr(model, APPROXIMATION_ERRORS_ATTR, dict(cfg.approximation_errors))
    sync_quantization_config(model)
    return changed


def load_checkpoint_weights(model: nn.Module, directory: Union[str, os.PathLike]) -> None:
    """Load the weights `save_pretrained` wrote into `directory` into `model`, strictly, by runtime names.

    transformers 5 saves some models under their original names (ViT: `encoder.layer.N...`) and renames them only
    when loading through `from_pretrained`; the Trainer's own resume loads the raw names non-strictly, so such a
    model would silently keep its initial weights. Tied parameters absent from the file (GPT-2's `lm_head`) are fine.
    """
    from safetensors.torch import load_file

    directory = str(directory)
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        state.update(load_file(os.path.join(directory, name)))
    names = _runtime_names(model, state)
    state = {names[k]: v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    current = model.state_dict(keep_vars=True)
    loaded_storage = {current[k].data_ptr() for k in state if k in current}
    missing = [k for k in missing if current[k].data_ptr() not in loaded_storage]  # tied to a loaded tensor: fine
    if missing or unexpected:
        raise ValueError(f"The weights in {directory} do not fit the model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}{' ...' if len(missing) + len(unexpected) > 10 else ''}. Resume with the "
                         "model and config the checkpoint was trained with.")
