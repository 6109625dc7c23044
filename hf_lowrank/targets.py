"""Which modules are factorized (target matching), their starting rank specs, and swapping modules in a model.

Shared by every method, the quantizer and the diagnostics; PEFT's `tuners_utils` plays this part there.
"""

from __future__ import annotations

import re
import warnings
from collections import defaultdict
from typing import Optional, Union

from torch import nn

from .config import LowRankConfig
from .layers import LINEAR_TYPES, LowRankLinear, linear_shape

# Last name components of output heads and classifiers, never factorized by "all-linear".
HEAD_NAMES = {"lm_head", "classifier", "score", "qa_outputs", "cls", "head"}
FACTORIZABLE = LINEAR_TYPES + (LowRankLinear,)
# How a rank_pattern key matches a layer name: the whole name, or its last components.
_PATTERN_FORM = r"(.*\.)?({})"


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

    Raises a `ValueError` listing the model's linear layers when nothing matches, when a name listed in
    `target_modules` is not a linear layer, and when a selected layer is shared (see `check_not_shared`).

    Frozen layers are skipped, with a warning: a layer whose weight (or, factorized, every factor) has
    `requires_grad=False` stays exactly as it is, dense and frozen, and no rank update ever touches it.
    Factorizing it would create new, trainable factors, so the weights the user froze would train.
    """
    check_patterns(config)
    spec = config.target_modules
    heads = _head_names(model) if spec == "all-linear" else set()
    targets, frozen = [], []
    # remove_duplicate=False: a module registered under two names is seen under both (refused below)
    for name, module in model.named_modules(remove_duplicate=False):
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
        if is_frozen(module):
            frozen.append(name)
            continue
        targets.append(name)
    if frozen:
        warnings.warn(f"hf_lowrank: {frozen} are frozen (requires_grad=False) and are left as they are: not "
                      "factorized, never rank-updated. Unfreeze them before get_lowrank_model to factorize them.")
    if not targets:
        if frozen:
            raise ValueError(f"target_modules={spec!r} selects only frozen layers ({frozen}): unfreeze them "
                             "(requires_grad_(True)) before get_lowrank_model, or target trainable layers.")
        names = linear_module_names(model)
        raise ValueError(f"target_modules={spec!r} matches no layer of {type(model).__name__}. Its linear "
                         f"layers are: {names}")
    check_not_shared(model, targets)
    return targets


def is_frozen(module: nn.Module) -> bool:
    """A linear layer whose weight does not train: the dense weight, or every factor, has `requires_grad=False`."""
    if isinstance(module, LowRankLinear):
        return not module.trainable_factors()
    return not module.weight.requires_grad


def check_patterns(config: LowRankConfig) -> None:
    """Fail with a `ValueError` naming the field when a regex of `config` does not compile, or `rank_pattern`
    is not a dict; run before anything is loaded (the patterns are only used once the model exists)."""
    if not isinstance(config.rank_pattern, dict):
        raise ValueError(f"rank_pattern must be a dict {{layer name or regex: rank}}, e.g. {{'c_attn': 0.25}}; "
                         f"got a {type(config.rank_pattern).__name__}: {config.rank_pattern!r}.")
    checks = [(f"rank_pattern key {key!r}", _PATTERN_FORM.format(key)) for key in config.rank_pattern]
    for field in ("target_modules", "exclude_modules"):
        value = getattr(config, field)
        if isinstance(value, str) and value != "all-linear":
            checks.append((f"{field}={value!r}", value))
    for what, pattern in checks:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"{what} is not a valid regular expression ({error}). Fix the regex, or give plain "
                             "layer names (a list of names or suffixes, e.g. ['c_attn', 'c_fc']).") from None


def check_not_shared(model: nn.Module, targets: list[str]) -> None:
    """Refuse targets that are shared: one module registered under several names (`m.a = m.b = Linear(...)`),
    or a weight tied to another module (an output head tied to the input embeddings). Factorizing would
    replace one of them only, silently untying them; a tied head would also save a model that cannot load."""
    aliases, owners = defaultdict(list), defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        aliases[id(module)].append(name)
        weight = dict(module.named_parameters(recurse=False)).get("weight")
        if weight is not None:
            owners[id(weight)].append(name)
    declared = getattr(model, "all_tied_weights_keys", None) or {}  # transformers' tie map {target: source}
    for name in targets:
        module = model.get_submodule(name)
        others = [n for n in aliases[id(module)] if n != name]
        if others:
            raise ValueError(f"{name!r} is the same module as {others} (one module registered under several "
                             "names): factorizing it would replace it under one name only and untie the copies. "
                             f"Give each name its own module, or exclude them all (exclude_modules={[name, *others]}).")
        weight = dict(module.named_parameters(recurse=False)).get("weight")
        tied = [n for n in owners.get(id(weight), []) if n not in aliases[id(module)]] if weight is not None else []
        for target, source in declared.items():
            for mine, other in ((target, source), (source, target)):
                if mine == f"{name}.weight" and other.rsplit(".", 1)[0] not in tied:
                    tied.append(other.rsplit(".", 1)[0])
        if tied:
            raise ValueError(f"{name!r} shares its weight with {tied} (tied weights, e.g. tie_word_embeddings): a "
                             "factorized layer has no weight to share, so the model would save but not load. "
                             f"Exclude it (exclude_modules=[{name!r}]), or untie the weights first (build the model "
                             "with tie_word_embeddings=False).")


def pattern_lookup(pattern: dict, name: str):
    """The value of the first `pattern` key that names `name` (exact, suffix or regex, as in PEFT)."""
    for key, value in pattern.items():
        if name == key or re.fullmatch(_PATTERN_FORM.format(key), name):
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


