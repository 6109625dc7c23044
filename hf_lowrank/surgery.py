"""Applies a method's decision: swaps/re-factors layers, carries optimizer state into the new
coordinates (also under FSDP2, re-sharding the changed layers), shares the decisions made on every process,
and re-prepares the model for the accelerator.

Surgery never decides ranks; methods never touch the optimizer. Whoever drives a change (the entry point,
the controller) records the resulting structure with `serialization.sync_quantization_config`.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn

from .layers import DENSE_LAYERS_ATTR, LowRankLinear, build_lowrank_linear, dense_weight_of, is_conv1d
from .methods.base import LayerChange
from .sharding import (check_sharded_training, distribute_like, full_tensor, is_fully_sharded, reset_lazy_init,
                       shard_module, unshard_module, world)
from .targets import replace_module

# Optimizer state entries that transform like the gradient (first moments) or like its square.
FIRST_MOMENTS = ("exp_avg", "momentum_buffer")
SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")


def torch_optimizer(optimizer):
    """The `torch.optim.Optimizer` inside an accelerate `AcceleratedOptimizer` (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def is_distributed() -> bool:
    """Whether several processes form a group."""
    return world()[1] > 1


def apply_changes(model: nn.Module, changes: list[LayerChange], optimizer=None) -> bool:
    """Apply `changes` to `model` (and the optimizer's parameters and state, if given).

    Returns True when parameters were created or changed shape, i.e. when a distributed wrapper must be
    re-prepared. Rotations that keep every shape, and layers held dense, return False.

    Under FSDP2 (`fully_shard`) every process must call it with the same changes (it gathers and re-shards):
    layer by layer, the changed layer gets full plain parameters (optimizer state gathered with them), the change
    is applied as on one process, and the layer is sharded again as its own FSDP unit (state sharded back).
    """
    opt = torch_optimizer(optimizer) if optimizer is not None else None
    if is_fully_sharded(model):
        return _apply_sharded(model, changes, opt)
    return _apply(model, changes, opt)


def _apply_sharded(model: nn.Module, changes: list[LayerChange], opt) -> bool:
    def gather_state(old, new):
        _move_param(opt, old, new, full_tensor)

    def shard_state(old, new):
        _move_param(opt, old, new, lambda value: distribute_like(value, new))

    structural = False
    for change in changes:  # one layer at a time: only its full parameters and moments are held at once
        spec = None if change.holds_dense else unshard_module(model, change.name, gather_state)
        _apply(model, [change], opt)
        if spec is not None:  # a layer FSDP did not manage stays as it was: unsharded
            shard_module(model, change.name, spec, shard_state)
        structural |= not change.holds_dense  # re-sharded: new parameter objects
    if structural:
        reset_lazy_init(model)
    return structural


def _move_param(opt, old: torch.Tensor, new: torch.Tensor, convert) -> None:
    """Put `new` in `old`'s place in the optimizer, with `old`'s state tensors passed through `convert`."""
    if opt is None:
        return
    state = opt.state.pop(old, None)
    if any(p is old for group in opt.param_groups for p in group["params"]):
        _swap_in_groups(opt, old, [new])
    if state:
        opt.state[new] = {k: convert(v) if torch.is_tensor(v) else v for k, v in state.items()}


def _apply(model: nn.Module, changes: list[LayerChange], opt) -> bool:
    structural = False
    dense_layers = getattr(model, DENSE_LAYERS_ATTR, None)
    if dense_layers is None:
        dense_layers = {}
        setattr(model, DENSE_LAYERS_ATTR, dense_layers)
    for change in changes:
        module = model.get_submodule(change.name)
        if change.holds_dense:
            if isinstance(module, LowRankLinear):
                raise ValueError(f"{change.name} is factorized already; a method can hold only dense layers dense.")
            dense_layers[change.name] = {"rank": change.rank, "reason": change.info.get("reason", "")}
            continue
        dense_layers.pop(change.name, None)
        if isinstance(module, LowRankLinear):
            structural |= _refactor(module, change, opt)
        else:
            replace_module(model, change.name, _factorize(module, change, opt))
            structural = True
    return structural


def _factorize(module: nn.Module, change: LayerChange, opt) -> LowRankLinear:
    """A `LowRankLinear` replacing a dense layer; the bias Parameter (and its optimizer state) is reused."""
    weight = module.weight
    has_base = bool(change.info.get("base"))
    layer = build_lowrank_linear(module, change.rank, has_sigma=change.S is not None, has_base=has_base, bias=False,
                                 trainable=change.trainable)
    layer.set_factors(change.U, change.S, change.V)
    if has_base:  # the dense weight stays, frozen, under the factors (W = W0 + U Vᵀ)
        layer.base.data = dense_weight_of(module).detach().clone().contiguous()
    layer.bias = module.bias
    if opt is not None:
        old_state = opt.state.pop(weight, None)
        if old_state is not None:
            old_state = {k: (v.t() if is_conv1d(module) and _is_matrix(v, weight) else v)
                         for k, v in old_state.items()}
        left = change.left if change.left is not None else change.U
        right = change.right if change.right is not None else change.V
        new_params = [getattr(layer, name) for name in layer.trainable_factors()]
        _swap_in_groups(opt, weight, new_params)
        for name, param in zip(layer.trainable_factors(), new_params):
            state = _mapped_state(opt, {"W": old_state} if old_state else {}, name, left, right, param, dense=True)
            if state:
                opt.state[param] = state
    return layer


def _refactor(layer: LowRankLinear, change: LayerChange, opt) -> bool:
    """New factors for an existing `LowRankLinear`. Factors that keep their shape keep their Parameter
    objects; resized ones are new Parameters, swapped into the optimizer. Returns True if any was replaced."""
    old_params = {n: getattr(layer, n) for n in layer.factor_names()}
    old_state = {}
    if opt is not None:
        old_state = {n: opt.state.pop(p) for n, p in old_params.items() if p in opt.state}
    replaced = layer.set_factors(change.U, change.S, change.V)
    layer.set_trainable(change.trainable)
    if opt is None:
        return replaced
    optimized = {id(p) for group in opt.param_groups for p in group["params"]}
    anchor = next((p for p in old_params.values() if id(p) in optimized), layer.bias)
    for name, old in old_params.items():
        new = getattr(layer, name)
        if not new.requires_grad:
            if id(old) in optimized:
                _swap_in_groups(opt, old, [])
            continue
        if id(old) in optimized:
            if new is not old:
                _swap_in_groups(opt, old, [new])
        else:
            _insert_after(opt, anchor, new)
        state = _mapped_state(opt, old_state, name, change.left, change.right, new, dense=False)
        if state:
            opt.state[new] = state
    return replaced


def _is_matrix(value, param) -> bool:
    return torch.is_tensor(value) and value.dim() == 2 and value.shape == param.shape


def _swap_in_groups(opt, old: torch.Tensor, new: list[torch.Tensor]) -> None:
    """Put `new` where `old` sits in the optimizer's param groups (same lr, weight decay, betas)."""
    for group in opt.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i:i + 1] = new
                return
    if new:
        warnings.warn("hf_lowrank: a replaced weight was not in the optimizer; its factors are not trained by it.")


def _insert_after(opt, anchor: torch.Tensor, new: torch.Tensor) -> None:
    """Add a newly trainable factor to the group of a sibling parameter of its layer."""
    for group in opt.param_groups:
        for i, p in enumerate(group["params"]):
            if p is anchor:
                group["params"].insert(i + 1, new)
                return
    warnings.warn("hf_lowrank: a factor became trainable but no parameter of its layer is in the optimizer.")


_warned_reset = set()


def _mapped_state(opt, old_state: dict, name: str, left, right, param, dense: bool) -> dict:
    """Optimizer state of factor `name` in the new coordinates (see `LayerChange`)."""
    source = old_state.get("W") if dense else old_state.get(name)
    if not source:
        return {}
    if name == "V" and dense:
        transform = lambda m, P, Q: m.t() @ P  # noqa: E731  ∂L/∂V = Gᵀ U
    elif name == "V":
        transform = lambda m, P, Q: m @ P  # noqa: E731
    elif name == "U":
        transform = lambda m, P, Q: m @ Q  # noqa: E731
    else:
        transform = lambda m, P, Q: P.t() @ m @ Q  # noqa: E731
    if left is None or right is None:
        raise ValueError(f"A change of factor {name!r} with optimizer state needs left/right coordinate maps.")
    P, Q = left.float(), right.float()
    state = {}
    for key, value in source.items():
        if not torch.is_tensor(value) or value.dim() == 0:
            state[key] = value  # step counters and scalars: keep (moments are carried, not reset)
        elif key in FIRST_MOMENTS:
            state[key] = transform(value.float(), P.to(value.device), Q.to(value.device)).to(value.dtype).contiguous()
        elif key in SECOND_MOMENTS:
            mapped = transform(value.float(), P.square().to(value.device), Q.square().to(value.device))
            state[key] = mapped.clamp_min(0).to(value.dtype).contiguous()
        else:
            kind = type(opt).__name__
            if kind not in _warned_reset:
                _warned_reset.add(kind)
                warnings.warn(f"hf_lowrank: {kind} keeps state {key!r} that cannot be carried into a new basis; "
                              "the state of factorized layers is reset at rank changes. Adam, AdamW and SGD "
                              "are carried over exactly.")
            return {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.dim() and value.shape != param.shape:
            raise RuntimeError(f"hf_lowrank: mapped optimizer state {key} has shape {tuple(value.shape)}, "
                               f"expected {tuple(param.shape)}")
    return state


# --- many processes ---------------------------------------------------------------------------------
_TENSOR_FIELDS = ("U", "S", "V", "left", "right")


def share_changes(local: list[LayerChange], device: torch.device) -> list[LayerChange]:
    """Every process's changes on every process (no-op when not distributed).

    Each process passes the changes it decided (those of the layers it owns; process 0 passes them all when
    decisions are not spread). Names, shapes and bookkeeping travel as small objects (`all_gather_object`);
    each process's factors then go out in one float32 broadcast from that process. Every process, the deciding
    one included, builds its changes from the broadcast buffer, so all apply bit-identical numbers. The result
    lists process 0's changes first, then process 1's, and so on.
    """
    if not is_distributed():
        return list(local)
    metas = [None] * dist.get_world_size()
    dist.all_gather_object(metas, [(c.name, tuple(c.trainable), c.info,
                                    [(k, tuple(getattr(c, k).shape)) for k in _TENSOR_FIELDS
                                     if getattr(c, k) is not None]) for c in local])
    rank = dist.get_rank()
    result = []
    for source, meta in enumerate(metas):
        sizes = [torch.Size(shape).numel() for *_, shapes in meta for _, shape in shapes]
        pieces = iter(())
        if sum(sizes):  # every process knows the sizes: all skip an empty broadcast alike
            if source == rank:
                flat = torch.cat([getattr(c, k).detach().to(device=device, dtype=torch.float32).reshape(-1)
                                  for c in local for k in _TENSOR_FIELDS if getattr(c, k) is not None])
            else:
                flat = torch.empty(sum(sizes), device=device, dtype=torch.float32)
            dist.broadcast(flat, src=source)
            pieces = iter(flat.split(sizes))
        for name, trainable, info, shapes in meta:
            # clone: each factor gets its own storage, not a view that keeps the whole buffer alive
            tensors = {k: next(pieces).reshape(shape).clone() for k, shape in shapes}
            result.append(LayerChange(name, tensors.get("U"), tensors.get("S"), tensors.get("V"), trainable,
                                      tensors.get("left"), tensors.get("right"), info))
    return result


def reprepare(accelerator, wrapped_model: nn.Module) -> nn.Module:
    """Wrap the model anew for `accelerator` after its parameters changed.

    Without it, DDP's reducer keeps syncing the old parameter list and new parameters silently stop being
    synchronized across processes. Single-process runs, and FSDP2 models (re-sharded in place by
    `apply_changes`), need nothing and get `wrapped_model` back.
    """
    from accelerate.utils import DistributedType

    check_sharded_training(accelerator)
    kind = accelerator.distributed_type
    if accelerator.num_processes == 1 or kind == DistributedType.NO:
        return wrapped_model
    inner = accelerator.unwrap_model(wrapped_model, keep_fp32_wrapper=False)
    if is_fully_sharded(inner):
        return wrapped_model  # FSDP2: apply_changes already re-sharded the changed layers in place
    accelerator._models = [m for m in accelerator._models if m is not wrapped_model and m is not inner]
    return accelerator.prepare_model(inner)
