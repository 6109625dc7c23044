"""What sets InRank's ranks: the initialization (reference rule) or learning (ours)?

For a GPT-2 MLP layer shape, with NO training, apply
  * the reference code's rule (spectrum of the current weight A[:r+b]ᵀ B[:, :r+b]ᵀ, kaiming-uniform
    factors preallocated at min(in, out)/2, the first k' in [r, r+b) whose "explained ratio"
    1 − Var(tail)/Var(s) exceeds τ), and
  * hf_lowrank's rule (spectrum of the cumulative update W_t − W_0),
at every check, and print the rank each reaches. Then train a small GPT-2 on real text for a few steps and
print the ranks our rule gives when something was learned.

    python benchmarks/inrank_init_ranks.py            # 768→3072 (GPT-2 small MLP), τ = 0.9 and 0.8
"""

from __future__ import annotations

import os as _os
import sys as _sys

_sys.path.insert(0, _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "training_scripts"))  # demo corpus

import argparse
import math

import torch


def reference_rule_ranks(n_in: int, n_out: int, init_rank: int, buffer: int, tau: float, checks: int, seed=0):
    """Ranks the reference rule reaches on untrained kaiming-uniform factors, check after check."""
    g = torch.Generator().manual_seed(seed)
    max_rank = min(n_in, n_out) // 2
    A = (torch.rand(max_rank, n_in, generator=g) * 2 - 1) / math.sqrt(n_in)
    B = (torch.rand(n_out, max_rank, generator=g) * 2 - 1) / math.sqrt(max_rank)
    r, ranks = init_rank, []
    for _ in range(checks):
        k = r + buffer
        s = torch.linalg.svdvals(A[:k].t() @ B[:, :k].t())
        total = torch.var(s)
        chosen = None
        for candidate in range(r, min(r + buffer, max_rank - buffer)):
            tail = s.clone()
            tail[:candidate] = 0
            chosen = candidate
            if 1 - torch.var(tail) / total > tau:
                break
        r = chosen if chosen is not None else r
        ranks.append(r)
    return ranks


def our_rule_ranks(n_in: int, n_out: int, init_rank: int, buffer: int, tau: float, checks: int):
    """Ranks hf_lowrank's InRank reaches on the same untrained layer."""
    from torch import nn

    from hf_lowrank import LowRankConfig, LowRankController, get_lowrank_model

    model = nn.Sequential()
    model.add_module("fc", nn.Linear(n_in, n_out))
    cfg = LowRankConfig(method="inrank", target_modules=["fc"], init_rank=init_rank, buffer_rank=buffer,
                        explained_ratio=tau, rank_warmup_steps=1, check_every=1, freeze_step=None)
    get_lowrank_model(model, cfg)
    controller = LowRankController(model)
    ranks = []
    for step in range(1, checks + 1):
        controller.step_to(step)
        ranks.append(controller.method.ranks["fc"])
    return ranks


def trained_ranks(steps: int, tau: float):
    """Ranks on a small GPT-2 after `steps` optimizer steps on the standard library's docstrings."""
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from hf_lowrank import LowRankConfig, LowRankTrainer, get_lowrank_model
    from demo_corpus import stdlib_docstrings, train_tokenizer

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/train.txt"
        with open(path, "w") as f:
            f.write(stdlib_docstrings(400_000, part="train"))
        tokenizer = train_tokenizer([path], vocab_size=2048)
        ids = tokenizer(open(path).read())["input_ids"]
        blocks = [ids[i:i + 128] for i in range(0, len(ids) - 128, 128)]
        data = Dataset.from_dict({"input_ids": blocks, "labels": blocks})
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_embd=256, n_layer=2, n_head=4, n_positions=128, vocab_size=2048))
        cfg = LowRankConfig(method="inrank", target_modules=["c_fc", "c_proj"], init_rank=2, buffer_rank=16,
                            explained_ratio=tau, rank_warmup_steps=5, check_every=5, freeze_step=None)
        model = get_lowrank_model(model, cfg)
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=16, max_steps=steps, learning_rate=1e-3,
                                 save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=steps)
        trainer = LowRankTrainer(model=model, args=args, train_dataset=data)
        trainer.train()
        return trainer.lowrank.method.ranks


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_in", type=int, default=768)
    p.add_argument("--n_out", type=int, default=3072)
    p.add_argument("--checks", type=int, default=15)
    p.add_argument("--train_steps", type=int, default=60)
    args = p.parse_args()
    print(f"untrained {args.n_in}→{args.n_out} layer, init_rank 2, buffer 100, {args.checks} checks")
    print(f"{'tau':>4}  {'reference rule (on W)':>24}  {'hf_lowrank (on W_t − W_0)':>26}")
    for tau in (0.9, 0.8):
        ref = reference_rule_ranks(args.n_in, args.n_out, 2, 100, tau, args.checks)
        ours = our_rule_ranks(args.n_in, args.n_out, 2, 100, tau, args.checks)
        print(f"{tau:>4}  {str(ref[-1]) + ' (after ' + str(len(ref)) + ' checks)':>24}  {ours[-1]:>26}")
    ranks = trained_ranks(args.train_steps, 0.9)
    print(f"\nsmall GPT-2 (256 wide) after {args.train_steps} training steps, τ = 0.9, buffer 16: ranks by layer")
    for name, rank in ranks.items():
        print(f"  {name}: {rank}")


if __name__ == "__main__":
    main()
