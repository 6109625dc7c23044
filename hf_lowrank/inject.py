"""`get_lowrank_model`: the entry point. Matches the targets, lets the method make its initial changes, applies
them through surgery and records the resulting structure in the model's config."""

from __future__ import annotations

from torch import nn

from .config import LowRankConfig
from .methods import get_method
from .serialization import sync_quantization_config
from .summary import record_approximation_errors
from .surgery import apply_changes
from .targets import check_rank_pattern, find_targets


def get_lowrank_model(model: nn.Module, config: LowRankConfig) -> nn.Module:
    """Prepare `model` for low-rank training with `config`; returns the same model object.

    Target layers are matched and validated now. What happens to them depends on the method: `svd`
    truncates right away (compress a pretrained model in one call), `inrank` factorizes at its starting
    rank, `oialr` keeps them dense until its conversion step (or converts now if `delay_steps == 0`).
    The config is attached as `model.lowrank_config`; `LowRankTrainer` and `LowRankController` read it there.

    Refused with a `ValueError`, before the model changes: an invalid regex in `target_modules`,
    `exclude_modules` or a `rank_pattern` key, and a target that is shared (one module under two names, or a
    weight tied to another module such as GPT-2's `lm_head`). Frozen targets (`requires_grad=False`) are
    skipped with a warning and stay dense and frozen (see `targets.find_targets`).
    """
    if getattr(model, "lowrank_config", None) is not None:
        raise ValueError("This model already went through get_lowrank_model; apply it once.")
    targets = find_targets(model, config)
    check_rank_pattern(config, targets)
    model.lowrank_config = config
    method = get_method(config)
    changes = method.initial_changes(model, targets)
    record_approximation_errors(model, changes)  # on the dense weights, before surgery replaces them; warns
    apply_changes(model, changes)
    sync_quantization_config(model)
    return model
