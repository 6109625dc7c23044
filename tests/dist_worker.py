"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (or alone for the reference run).

Trains a tiny GPT-2 with OIALR (conversion + cuts) and writes, per process, the ranks, parameter checksums
and losses to OUT/rank{N}.json.
"""

import hashlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from conftest import tiny_gpt2  # noqa: E402

from hf_lowrank import LowRankConfig, LowRankController, LowRankLinear, LowRankTrainer, get_lowrank_model  # noqa: E402

# WORKER_CONFIG (JSON LowRankConfig kwargs) runs another method (tests/test_contract.py)
CFG = json.loads(os.environ.get("WORKER_CONFIG", "null")) or dict(
    method="oialr", delay_steps=3, update_every=2, sigma_cutoff=0.9, rank_pattern={"c_attn|c_proj|c_fc": 0.25})
STEPS = 8
GLOBAL_BATCH = 8


def dataset(n=96, length=16):
    from datasets import Dataset

    g = torch.Generator().manual_seed(123)
    ids = torch.randint(0, 128, (n, length), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def checksums(model):
    """Per-tensor checksums; factorized layers by their dense product (SVD signs are arbitrary)."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = hashlib.sha1(p.detach().float().numpy().tobytes()).hexdigest()
    return out


def run_trainer(out, world):
    from transformers import TrainingArguments

    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(**CFG))
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=GLOBAL_BATCH // world, max_steps=STEPS,
                             learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             seed=0, disable_tqdm=True, bf16=os.environ.get("WORKER_BF16") == "1")
    trainer = LowRankTrainer(model=model, args=args, train_dataset=dataset())
    trainer.train()
    acc = trainer.accelerator
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return acc, trainer.model, losses, trainer.lowrank.history


def run_raw_loop(out, world):
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(**CFG))
    data = dataset().with_format("torch")
    loader = DataLoader(data, batch_size=GLOBAL_BATCH // world, shuffle=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    wrapped, optimizer, loader = acc.prepare(model, optimizer, loader)
    controller = LowRankController(wrapped, optimizer=optimizer, accelerator=acc, num_training_steps=STEPS)
    losses = []
    for step, batch in enumerate(loader):
        if step == STEPS:
            break
        loss = wrapped(**batch).loss
        acc.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(acc.gather(loss.detach()[None]).mean().item())
        if controller.step():
            wrapped = controller.reprepare(wrapped)
    return acc, model, losses, controller.history


def main():
    mode, out = sys.argv[1], sys.argv[2]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    acc, model, losses, history = (run_trainer if mode == "trainer" else run_raw_loop)(out, world)
    record = {
        "num_processes": acc.num_processes, "distributed_type": str(acc.distributed_type),
        "ranks": {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)},
        "checksums": checksums(model), "losses": losses, "events": [h["event"] for h in history],
        "dense": {n: m.dense_matrix().detach().tolist() for n, m in model.named_modules()
                  if isinstance(m, LowRankLinear) and n.endswith("h.1.mlp.c_fc")},
    }
    with open(os.path.join(out, f"rank{acc.process_index}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
