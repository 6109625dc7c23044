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
from typing import Optional, Union

import torch
from torch import nn
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .config import LowRankConfig
from .layers import LowRankLinear, break_even_rank, build_lowrank_linear, linear_shape
from .linalg import svd_f32
from .layers import DENSE_LAYERS_ATTR
from .targets import replace_module
from .version import __version__

QUANT_METHOD = "hf_lowrank"


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
    """

    def __init__(self, rank_pattern: Optional[dict] = None, sigma_layers: Optional[list] = None,
                 base_layers: Optional[list] = None, trainable: Optional[dict] = None, lowrank_config: Optional[dict] = None,
                 hf_lowrank_version: Optional[str] = None, dense_layers: Optional[dict] = None, **kwargs):
        self.quant_method = QUANT_METHOD
        self.rank_pattern = dict(rank_pattern or {})
        self.sigma_layers = sorted(sigma_layers or [])
        self.base_layers = sorted(base_layers or [])
        self.trainable = dict(trainable or {})
        self.lowrank_config = dict(lowrank_config or {})
        self.dense_layers = dict(dense_layers or {})
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
        )


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


def _checkpoint_shapes(checkpoint_files) -> dict[str, tuple]:
    """Tensor shapes from safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    shapes = {}
    for path in checkpoint_files or []:
        if not str(path).endswith(".safetensors"):
            raise ValueError(f"hf_lowrank models load from safetensors only; found {path}.")
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
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
    except Exception:  # internals moved: fall back to the names as saved
        return {key: key for key in saved_keys}


def _check_saved_shapes(model: nn.Module, checkpoint_files) -> None:
    """Fail clearly when config.json's ranks disagree with the factors stored in the weights file."""
    shapes = _checkpoint_shapes(checkpoint_files)
    if not shapes:
        return
    saved = {runtime: shapes[key] for key, runtime in _runtime_names(model, shapes).items()}
    for name, module in model.named_modules():
        if not isinstance(module, LowRankLinear):
            continue
        for factor in module.factor_names():
            expected = tuple(getattr(module, factor).shape)
            found = saved.get(f"{name}.{factor}")
            if found is None:
                raise ValueError(f"config.json says {name} is factorized at rank {module.rank}, but the weights "
                                 f"file holds no {factor} factor for it: the directory is inconsistent.")
            if found != expected:
                raise ValueError(f"config.json records rank {module.rank} for {name}, so {factor} should be "
                                 f"{expected}, but the weights file holds {found}. The directory is "
                                 "inconsistent (config.json edited, or weights from another run).")


@register_quantizer(QUANT_METHOD)
class LowRankHfQuantizer(HfQuantizer):
    """Rebuilds factorized modules before transformers loads the weights."""

    requires_calibration = False

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        cfg = self.quantization_config
        for name, rank in cfg.rank_pattern.items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"config.json records a factorized layer {name!r} that {type(model).__name__} "
                                 "does not have (saved by another transformers version?).") from None
            n_in, n_out = linear_shape(module)
            if not 0 <= rank <= min(n_in, n_out):
                raise ValueError(f"config.json records rank {rank} for {name!r}, outside [0, {min(n_in, n_out)}].")
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
        if self.quantization_config.lowrank_config and getattr(model, "lowrank_config", None) is None:
            model.lowrank_config = LowRankConfig.from_dict(self.quantization_config.lowrank_config)
        setattr(model, DENSE_LAYERS_ATTR, dict(self.quantization_config.dense_layers))
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
    for attr in ("lowrank_config", DENSE_LAYERS_ATTR):
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
        with open(structure_path) as f:
            return json.load(f)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path} holds neither config.json nor {STRUCTURE_NAME}: not a checkpoint.")
    with open(config_path) as f:
        quant = json.load(f).get("quantization_config") or {}
    return quant if quant.get("quant_method") == QUANT_METHOD else {}


def restructure_like_checkpoint(model: nn.Module, path: str) -> bool:
    """Give `model` the factorized structure saved in `path`, before its weights and optimizer load.

    Used when resuming: a model built dense (or at other ranks) gets the checkpoint's layers and shapes.
    For a raw `accelerate` loop call it before creating the optimizer and `accelerator.prepare`.
    Returns True if anything changed.
    """
    quant = saved_structure(path)
    if quant.get("quant_method") != QUANT_METHOD:
        return False
    cfg = LowRankQuantizationConfig(**{k: v for k, v in quant.items() if k != "quant_method"})
    changed = False
    for name, rank in cfg.rank_pattern.items():
        module = model.get_submodule(name)
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
    sync_quantization_config(model)
    return changed
