"""Which modules are factorized (target matching), their starting rank specs, and swapping modules in a model.

Shared by every method, the quantizer and the diagnostics; PEFT's `tuners_utils` plays this part there.
"""

from __future__ import annotations

import re
from typing import Optional, Union

from torch import nn

from .config import LowRankConfig
from .layers import LINEAR_TYPES, LowRankLinear, linear_shape

# Last name components of output heads and classifiers, never factorized by "all-linear".
HEAD_NAMES = {"lm_head", "classifier", "score", "qa_outputs", "cls", "head"}
FACTORIZABLE = LINEAR_TYPES + (LowRankLinear,)


def linear_module_names(model: nn.Module) -> list[str]:
    """Names of every `nn.Linear`, `Conv1D` or `LowRankLinear` in `model`, in `named_modules()` order."""
    return [name for name, module in model.named_modules() if isinstance(module, FACTORIZABLE)]


def _head_names(model: nn.Module) -> set[str]:
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if module is out or any(part in HEAD_NAMES for part in name.split(".")):
            heads.add(name)
    return heads


def name_matches(name: str, spec: Optional[Union[str, list[str]]]) -> bool:
    """PEFT's rule: a string is a regex that must match the whole name; a list holds exact names or suffixes."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


def find_targets(model: nn.Module, config: LowRankConfig) -> list[str]:
    """Module names `config` selects, in `named_modules()` order.

    Raises a `ValueError` listing the model's linear layers when nothing matches, and when a name listed
    in `target_modules` is not a linear layer.
    """
    spec = config.target_modules
    heads = _head_names(model) if spec == "all-linear" else set()
    targets = []
    for name, module in model.named_modules():
        if not name or name_matches(name, config.exclude_modules):
            continue
        if spec == "all-linear":
            selected = isinstance(module, FACTORIZABLE) and name not in heads
        elif isinstance(spec, str):  # a regex selects the linear layers among what it matches
            selected = isinstance(module, FACTORIZABLE) and name_matches(name, spec)
        else:  # names listed one by one must all be linear layers
            selected = name_matches(name, spec)
        if not selected:
            continue
        if not isinstance(module, FACTORIZABLE):
            raise ValueError(f"target_modules selects {name!r}, a {type(module).__name__}: only nn.Linear and "
                             "GPT-2 Conv1D layers can be factorized. Narrow target_modules or add it to exclude_modules.")
        targets.append(name)
    if not targets:
        names = linear_module_names(model)
        raise ValueError(f"target_modules={spec!r} matches no layer of {type(model).__name__}. Its linear "
                         f"layers are: {names}")
    return targets


def pattern_lookup(pattern: dict, name: str):
    """The value of the first `pattern` key that names `name` (exact, suffix or regex, as in PEFT)."""
    for key, value in pattern.items():
        if name == key or re.fullmatch(rf"(.*\.)?({key})", name):
            return value
    return None


def check_rank_pattern(config: LowRankConfig, targets: list[str]) -> None:
    """Every `rank_pattern` key must name at least one target layer."""
    for key in config.rank_pattern:
        if not any(pattern_lookup({key: 0}, name) is not None for name in targets):
            raise ValueError(f"rank_pattern key {key!r} matches no factorized layer. Targets: {targets}")


def rank_from_spec(spec, max_rank: int, name: str) -> int:
    """An int rank or a float fraction of `max_rank`, validated against `[1, max_rank]`."""
    rank = max(1, round(spec * max_rank)) if isinstance(spec, float) else int(spec)
    if not 1 <= rank <= max_rank:
        raise ValueError(f"Rank {rank} for {name!r} is outside [1, {max_rank}] (min(in, out) of that layer).")
    return rank


def layer_max_rank(module: nn.Module) -> int:
    """The full rank `min(in, out)` of a linear layer, dense or factorized."""
    n_in, n_out = linear_shape(module)
    return min(n_in, n_out)


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The parent module of `name` and the attribute under which it holds it."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where `name` is, keeping the old module's train/eval mode."""
    parent, child = get_submodule_parent(model, name)
    new.train(getattr(parent, child).training)
    setattr(parent, child, new)


