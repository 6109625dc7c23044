"""Many processes: which process decides which layer, and rank changes under FSDP2 (`fully_shard`).

Spreading decisions: every process computes the decisions of a share of the layers (`assign_owners`, balanced by
a shape-only cost estimate, identical on every process); surgery then shares the results.

FSDP2: parameters are `DTensor` shards. A decision needs full tensors (`gathered`); a change is applied to plain
full tensors (`unshard_module`) and the changed module is sharded again as its own FSDP unit (`shard_module`),
after its parameters were taken out of the parameter group that held them (`release`), so no FSDP group keeps
all-gathering stale parameters. The root's lazy initialization is then redone (`reset_lazy_init`) so the next
forward registers the new units. The last two reach into FSDP2's state (`_fsdp_param_groups`, `fsdp_params`,
`_is_root`, `_state_ctx`), checked against torch 2.13; torch has no public API to reshard a changed module.
This module knows nothing about optimizers: surgery carries their state using what these functions return.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Container, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from .layers import LowRankLinear, build_lowrank_linear, linear_shape
from .targets import replace_module

# Opt-in for accelerate's FSDP2 (the Trainer's route), which only a GPU run can check.
ALLOW_FSDP2_ENV = "HF_LOWRANK_ALLOW_FSDP2"


def world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# --- spreading decisions -----------------------------------------------------------------------------
def decision_cost(module: nn.Module) -> int:
    """Rough multiply-adds of deciding one layer: an SVD of its dense weight, or, for a factorized layer,
    rank-sized work (an SVD of `S` or of an r×r product, and products of the bases with r×r matrices)."""
    n_in, n_out = linear_shape(module)
    if isinstance(module, LowRankLinear):
        r = module.rank
        return (n_in + n_out) * r * r + r ** 3
    return n_in * n_out * min(n_in, n_out)


def assign_owners(model: nn.Module, names: list[str], world_size: int) -> dict[str, int]:
    """The process that decides each layer: longest first, each to the least loaded process (ties to the lower
    rank). Uses shapes only, so every process computes the same assignment."""
    costs = [decision_cost(model.get_submodule(name)) for name in names]
    loads = [0] * world_size
    owners = {}
    for i in sorted(range(len(names)), key=lambda i: (-costs[i], i)):
        process = min(range(world_size), key=lambda p: (loads[p], p))
        owners[names[i]] = process
        loads[process] += costs[i]
    return owners


# --- FSDP2 -------------------------------------------------------------------------------------------
def _fsdp_module_class():
    if not dist.is_available():
        return None
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def is_fully_sharded(model: nn.Module) -> bool:
    """Whether `fully_shard` (FSDP2) was applied to `model` or any of its submodules."""
    cls = _fsdp_module_class()
    return cls is not None and any(isinstance(m, cls) for m in model.modules())


def _is_dtensor(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def full_tensor(value: Any) -> Any:
    """The whole of a `DTensor` (an all-gather every process must join); anything else unchanged."""
    if _is_dtensor(value):
        with torch.no_grad():
            return value.full_tensor()
    return value


def distribute_like(value: Any, param: torch.Tensor) -> Any:
    """`value` (a full tensor shaped like `param`'s global shape, identical on every process) sharded as the
    DTensor `param` is; no communication. Anything else unchanged."""
    if not (_is_dtensor(param) and torch.is_tensor(value) and value.shape == param.shape):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)


# The FSDP2 internals `release` and `reset_lazy_init` rely on (torch 2.13).
_STATE_ATTRS = ("_fsdp_param_groups", "_is_root", "_state_ctx")


def _states(model: nn.Module) -> list:
    """The FSDP states in `model`, in `modules()` order, each once; refuses a torch whose FSDP2 internals differ
    from those this module was written against (rather than re-sharding wrongly)."""
    cls = _fsdp_module_class()
    states = []
    for module in model.modules():
        if cls is not None and isinstance(module, cls):
            state = module._get_fsdp_state()
            if state not in states:
                states.append(state)
    for state in states:
        if not all(hasattr(state, a) for a in _STATE_ATTRS) or not all(
                hasattr(g, "fsdp_params") and hasattr(g, "mesh_info") for g in state._fsdp_param_groups):
            raise RuntimeError(f"hf_lowrank re-shards changed layers through FSDP2 internals of torch 2.13, which "
                               f"differ in torch {torch.__version__}: rank changes under fully_shard are not "
                               "supported with this version. Use DDP, or torch 2.13.")
    return states


def _reshard_all(model: nn.Module) -> None:
    """Make every module hold its sharded parameters (a no-op after a normal backward)."""
    cls = _fsdp_module_class()
    for module in model.modules():
        if isinstance(module, cls):
            module.reshard()


@contextmanager
def gathered(model: nn.Module, names: list[str], keep: Optional[Container[str]] = None) -> Iterator[None]:
    """Inside the block, the modules `names` in `keep` (default: all of them) hold full plain copies of their
    parameters, so a method reads ordinary tensors; the shards are put back afterwards.

    A no-op unless `model` is fully sharded. Collective: every process calls it with the same `names` (each
    layer is all-gathered everywhere, and kept only where it is decided).
    """
    if not is_fully_sharded(model):
        yield
        return
    _reshard_all(model)
    swapped = []
    for name in names:
        module = model.get_submodule(name)
        for pname, param in list(module._parameters.items()):
            if not _is_dtensor(param):
                continue
            full = full_tensor(param)
            if keep is None or name in keep:
                # _parameters directly: the module may be an FSDP unit, whose attribute hooks must not run
                module._parameters[pname] = nn.Parameter(full, requires_grad=param.requires_grad)
                swapped.append((module, pname, param))
    try:
        yield
    finally:
        for module, pname, param in swapped:
            module._parameters[pname] = param


@dataclass
class ShardSpec:
    """How a module's parameters were sharded, to shard its replacement the same way."""

    mesh: Any
    mp_policy: Any
    offload_policy: Any


def release(model: nn.Module, module: nn.Module) -> Optional[ShardSpec]:
    """Remove `module`'s parameters from the FSDP parameter group holding them (its own unit's or an
    ancestor's), so that group stops all-gathering and reduce-scattering them; returns how they were sharded
    (None if FSDP did not manage them)."""
    spec = None
    for state in _states(model):
        for group in list(state._fsdp_param_groups):
            kept = [p for p in group.fsdp_params if p._module_info.module is not module]
            if len(kept) == len(group.fsdp_params):
                continue
            spec = spec or ShardSpec(group.mesh_info.mesh, group.mp_policy, group.offload_policy)
            group.fsdp_params = kept
            if not kept:
                state._fsdp_param_groups.remove(group)
    return spec


def unshard_module(model: nn.Module, name: str,
                   on_param: Callable[[torch.Tensor, nn.Parameter], None]) -> Optional[ShardSpec]:
    """Give module `name` plain full parameters and take it out of FSDP's management, ready for surgery.

    `on_param(old, new)` is called for each replaced parameter (surgery moves its optimizer state). A factorized
    layer is rebuilt as a fresh plain `LowRankLinear` (an FSDP unit cannot be sharded twice); a dense layer keeps
    its object, since surgery replaces it anyway. Collective. Returns how the module was sharded.
    """
    module = model.get_submodule(name)
    spec = release(model, module)
    params = {}
    for pname, param in module._parameters.items():
        if param is not None and _is_dtensor(param):
            new = nn.Parameter(full_tensor(param), requires_grad=param.requires_grad)
            on_param(param, new)
            param = new
        params[pname] = param
    if isinstance(module, LowRankLinear) and isinstance(module, _fsdp_module_class()):
        fresh = build_lowrank_linear(module, module.rank, has_sigma=module.S is not None,
                                     has_base=module.base is not None, trainable=module.trainable_factors())
        for pname, param in params.items():
            setattr(fresh, pname, param)
        replace_module(model, name, fresh)
    else:
        module._parameters.update(params)
    return spec


def shard_module(model: nn.Module, name: str, spec: ShardSpec,
                 on_param: Callable[[nn.Parameter, nn.Parameter], None]) -> None:
    """Shard module `name` (plain, after surgery) as its own FSDP unit, like `spec`; `on_param(old, new)` is
    called for each parameter that became a DTensor. Call `reset_lazy_init` once all changes are done."""
    from torch.distributed.fsdp import fully_shard

    module = model.get_submodule(name)
    before = dict(module.named_parameters(recurse=False))
    fully_shard(module, mesh=spec.mesh, mp_policy=spec.mp_policy, offload_policy=spec.offload_policy)
    for pname, param in module.named_parameters(recurse=False):
        if param is not before[pname]:
            on_param(before[pname], param)


def reset_lazy_init(model: nn.Module) -> None:
    """Make the next forward redo FSDP2's lazy initialization over the whole tree: find the root again,
    register the new units, share the communication context, drop the replaced units."""
    for state in _states(model):
        state._is_root = None
        state._state_ctx = type(state._state_ctx)()


# --- which sharded training is supported -------------------------------------------------------------
def fsdp2_allowed() -> bool:
    """Whether the user opted in to accelerate's FSDP2 (`HF_LOWRANK_ALLOW_FSDP2=1`)."""
    return os.environ.get(ALLOW_FSDP2_ENV, "").strip().lower() in ("1", "true", "yes")


def check_sharded_training(accelerator) -> None:
    """Refuse DeepSpeed, FSDP1, and accelerate's FSDP2 without the opt-in, naming what works."""
    if accelerator is None:
        return
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return
    fsdp2 = kind == DistributedType.FSDP and getattr(accelerator, "is_fsdp2", False)
    if fsdp2 and fsdp2_allowed():
        return
    what = "accelerate's FSDP2 without the opt-in" if fsdp2 else ("FSDP1" if kind == DistributedType.FSDP
                                                                   else "DeepSpeed")
    raise RuntimeError(
        f"hf_lowrank does not run under {what}: rank changes replace parameters, which sharded training would "
        "silently stop synchronizing. What works: DDP (`accelerate launch --multi_gpu`, or multi-CPU), and FSDP2 "
        "through torch's `fully_shard` in your own loop with LowRankController (changed layers are re-sharded; "
        "tested on CPU). accelerate's FSDP2 (fsdp_version: 2, e.g. LowRankTrainer) uses the same code but has not "
        f"been proven on GPUs yet: set {ALLOW_FSDP2_ENV}=1 to use it (benchmarks/gpu_fsdp2_check.py checks it "
        "against DDP). FSDP1 and DeepSpeed are not supported.")
