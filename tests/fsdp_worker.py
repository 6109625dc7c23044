"""Run by tests/test_fsdp.py under `torchrun --nproc_per_node 2`: rank changes under FSDP2 (`fully_shard`) on CPU.

For each scenario (OIALR: conversion and a cut; InRank: growth and freeze) it trains a tiny GPT-2 sharded with
`fully_shard` (one target layer, each block, then the root) in a raw loop with `LowRankController`, checks at every decision step
that the spread decisions equal process 0's, saves a checkpoint after a rank change (torch.distributed.checkpoint
for model and optimizer, `controller.save` for the rest), resumes a fresh model from it, and writes per process
the ranks, full-parameter checksums, losses and events to OUT/rank{N}.json. `reference(...)` is the same loop on
one process without FSDP (the test calls it in its own process).
"""

import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from conftest import tiny_gpt2  # noqa: E402

from hf_lowrank import LowRankConfig, LowRankController, LowRankLinear, get_lowrank_model  # noqa: E402
from hf_lowrank.sharding import full_tensor  # noqa: E402

STEPS = 8
GLOBAL_BATCH = 8
SCENARIOS = {
    # conversion at step 3, cuts at 5 and 7; checkpoint after the cut at 5
    "oialr": (dict(method="oialr", delay_steps=3, update_every=2, sigma_cutoff=0.9,
                   rank_pattern={"c_attn|c_proj|c_fc": 0.25}), 5),
    # checks at 2 and 4 (growth), freeze at 6; checkpoint after the growth at 4
    "inrank": (dict(method="inrank", init_rank=2, buffer_rank=2, rank_warmup_steps=2, check_every=2,
                    freeze_step=6, explained_ratio=0.99), 4),
}


def batches():
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, 128, (GLOBAL_BATCH, 16), generator=g) for _ in range(STEPS)]


def build(cfg, seed=0, checkpoint=None, shard=True):
    """A tiny GPT-2 with `cfg`; with `checkpoint`, restructured to its ranks; sharded with fully_shard."""
    model = get_lowrank_model(tiny_gpt2(seed=seed), LowRankConfig(**cfg))
    if checkpoint is not None:
        LowRankController.restructure(model, checkpoint)  # shapes before sharding and the optimizer
    if shard:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.transformer.h[0].mlp.c_fc)  # one target its own FSDP unit from the start, the rest not
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    return model, optimizer


def full_state(model):
    """Full parameters by name (collective under FSDP: every process gathers every tensor)."""
    return {name: full_tensor(p).detach().clone() for name, p in model.named_parameters()}


def same_changes(a, b) -> bool:
    if [c.name for c in a] != [c.name for c in b]:
        return False
    for x, y in zip(a, b):
        if x.info != y.info or tuple(x.trainable) != tuple(y.trainable):
            return False
        for key in ("U", "S", "V", "left", "right"):
            tx, ty = getattr(x, key), getattr(y, key)
            if (tx is None) != (ty is None) or (tx is not None and not torch.equal(tx, ty)):
                return False
    return True


def train(model, optimizer, controller, data, start, stop, rank, world, compare=None, save=None):
    """Steps `start`..`stop`-1 on this process's slice of each global batch; returns the global losses."""
    losses = []
    per = GLOBAL_BATCH // world
    for step in range(start, stop):
        ids = data[step][rank * per:(rank + 1) * per]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)
        if compare is not None and controller.method.is_due(step + 1, controller.num_training_steps):
            spread = controller.decide_changes(step + 1)
            single = controller.decide_changes(step + 1, spread=False)
            compare.append({"step": step + 1, "changes": len(spread), "equal": same_changes(spread, single)})
        controller.step()
        if save is not None and save[0] == step + 1:
            save_checkpoint(model, optimizer, controller, save[1], rank)
    return losses


def save_checkpoint(model, optimizer, controller, directory, rank):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=directory)
    if rank == 0:
        controller.save(directory)
    dist.barrier()


def resume(cfg, directory, start, data, rank, world):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, optimizer = build(cfg, seed=1, checkpoint=directory)  # another init: everything comes from disk
    controller = LowRankController(model, optimizer=optimizer, num_training_steps=STEPS)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert controller.load(directory)
    train(model, optimizer, controller, data, start, STEPS, rank, world)
    return model


def stale_fsdp_params(model) -> int:
    """FSDP parameters (FSDP2 internals) whose module is no longer in the model: a group still gathering them."""
    from torch.distributed.fsdp import FSDPModule

    modules = set(model.modules())
    return sum(p._module_info.module not in modules for m in model.modules() if isinstance(m, FSDPModule)
               for group in m._get_fsdp_state()._fsdp_param_groups for p in group.fsdp_params)


def ranks(model):
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def checksum(state):
    return {n: hashlib.sha1(t.float().contiguous().numpy().tobytes()).hexdigest() for n, t in state.items()}


def reference(name):
    """The same run on one process, unsharded, with the whole global batch: (losses, ranks, events, state)."""
    cfg, _ = SCENARIOS[name]
    model, optimizer = build(cfg, shard=False)
    controller = LowRankController(model, optimizer=optimizer, num_training_steps=STEPS)
    controller.begin()
    losses = train(model, optimizer, controller, batches(), 0, STEPS, 0, 1)
    return losses, ranks(model), [h["event"] for h in controller.history], full_state(model)


def main():
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = batches()
    record = {"world": world}
    for name, (cfg, save_at) in SCENARIOS.items():
        model, optimizer = build(cfg)
        controller = LowRankController(model, optimizer=optimizer, num_training_steps=STEPS)
        controller.begin()
        compare = []
        directory = os.path.join(out, f"{name}-ckpt")
        losses = train(model, optimizer, controller, data, 0, STEPS, rank, world, compare, (save_at, directory))
        final = full_state(model)
        resumed = full_state(resume(cfg, directory, save_at, data, rank, world))
        record[name] = {
            "losses": losses, "ranks": ranks(model), "events": [h["event"] for h in controller.history],
            "checksums": checksum(final), "compare": compare,
            "sharded": all(type(p).__name__ == "DTensor" for p in model.parameters()),
            "stale_fsdp_params": stale_fsdp_params(model),
            "resume_max_diff": max((resumed[n] - final[n]).abs().max().item() for n in final),
            "resume_same_names": sorted(resumed) == sorted(final),
            "full": {n: t.tolist() for n, t in final.items() if n.endswith(("h.1.mlp.c_fc.U", "h.1.mlp.c_fc.V",
                                                                            "h.1.mlp.c_fc.S", "h.0.ln_1.weight"))},
        }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
