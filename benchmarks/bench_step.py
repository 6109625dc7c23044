"""Whole training step of a factorized GPT-2 against dense, and against the step's Amdahl limit.

A guard: factorizing the attention and MLP layers can only speed up the part of a step those layers take; the
rest (embeddings, attention scores, layer norms, the head, the loss, the optimizer on other parameters) does not
shrink. This script measures one full training step (forward, backward, AdamW step, zero_grad) of these rows,
built from one random-weight GPT-2 (random weights time the same as trained ones):

  dense    the GPT-2 itself
  oialr    OIALR's training form at rank fraction r in every attention and MLP layer: `U Σ Vᵀ`, only Σ trains
  inrank   InRank's (and svd's) form at rank fraction r: `U Vᵀ`, U and V train
  free     every target layer replaced by a stand-in with the same input/output shapes and no products
           (`y = sum(x) + b`, broadcast): the step's cost outside those layers

The Amdahl limit of a row is the speed-up it would reach if its target layers ran at their FLOP ratio to dense
and everything else cost what it costs now:

    limit = T_dense / (T_free + (T_dense - T_free) * F_row / F_dense)

where `F_*` are the FLOPs of one step (forward + backward, `FlopCounterMode`) minus those of the `free` row,
i.e. the FLOPs of the target layers. "% lim" = speed-up / limit; the issue's guard is ≥ 80 %.

Timing is interleaved: each round runs one step of every row, in a rotating order, after warm-up rounds;
the speed-up is the median over rounds of (dense time / row time) in the same round.

    python benchmarks/bench_step.py                        # GPT-2 4×768, context 256, batch 8, r = 0.25 and 0.1
    python benchmarks/bench_step.py --preset main          # the main job's model (4×192, context 128) at its end ranks
    python benchmarks/bench_step.py --quick                # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel

from hf_lowrank import LowRankConfig, get_lowrank_model, lowrank_summary
from hf_lowrank.layers import linear_shape
from hf_lowrank.targets import find_targets, replace_module

TARGETS = ("c_attn", "c_proj", "c_fc")  # every attention and MLP layer of GPT-2; the head stays dense
PRESETS = {
    # GPT-2-small layers (width 768), 4 of them; rank fractions where OIALR/InRank runs end (~0.25) and below
    "small": dict(n_embd=768, n_layer=4, n_head=12, vocab=8192, context=256, batch=8, fractions=[0.25, 0.1]),
    # the main job (`training_scripts/run_clm.py`): it ends at 8 % of the total rank (README)
    "main": dict(n_embd=192, n_layer=4, n_head=4, vocab=4096, context=128, batch=8, fractions=[0.08]),
    "quick": dict(n_embd=128, n_layer=2, n_head=4, vocab=1024, context=64, batch=4, fractions=[0.25]),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--quick", action="store_true", help="same as --preset quick with 2 rounds")
    p.add_argument("--fractions", nargs="+", type=float, default=None, help="rank fractions (default: the preset's)")
    for name in ("n_embd", "n_layer", "n_head", "vocab", "context", "batch"):
        p.add_argument(f"--{name}", type=int, default=None, help="override the preset")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (median); default 5, 2 with --quick")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the rows as JSON to PATH")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.preset = "quick"
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.repeats = args.repeats or (2 if args.quick else 5)
    return args


class FreeStandIn(nn.Module):
    """Same shapes as the layer it replaces, no products: `y = Σ_i x_i + b` broadcast to the output width.
    The output still depends on the input, so the backward runs through the whole network as before."""

    def __init__(self, like: nn.Module):
        super().__init__()
        self.in_features, self.out_features = linear_shape(like)
        self.bias = nn.Parameter(torch.zeros(self.out_features))

    def forward(self, x):
        return x.sum(-1, keepdim=True) + self.bias


def replace_targets(model, make):
    """Each target layer (the rows' `target_modules`, as the library selects them) replaced by `make(layer)`."""
    for name in find_targets(model, LowRankConfig(target_modules=list(TARGETS))):
        replace_module(model, name, make(model.get_submodule(name)))
    return model


def build_rows(args):
    torch.manual_seed(args.seed)
    dense = GPT2LMHeadModel(GPT2Config(
        n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head, vocab_size=args.vocab,
        n_positions=args.context, bos_token_id=None, eos_token_id=None, attn_implementation="sdpa"))
    rows = {"dense": dense, "free": replace_targets(copy.deepcopy(dense), FreeStandIn)}
    for r in args.fractions:
        pattern = {t: r for t in TARGETS}
        # delay_steps=0, sigma_cutoff=0: converted at injection, at exactly the rank_pattern's fraction
        rows[f"oialr {r:g}"] = get_lowrank_model(copy.deepcopy(dense), LowRankConfig(
            method="oialr", delay_steps=0, sigma_cutoff=0.0, rank_pattern=pattern))
        rows[f"inrank {r:g}"] = get_lowrank_model(copy.deepcopy(dense), LowRankConfig(
            method="svd", rank_pattern=pattern))
    for name, model in rows.items():
        model.train()
        if name not in ("dense", "free"):
            summary = lowrank_summary(model)
            print(f"# {name}: {len(summary.layers)} factorized layers, rank fraction {summary.rank_fraction:.3f}, "
                  f"{len(summary.dense_layers)} held dense (above break-even)")
    return rows


class Stepper:
    """One model with its AdamW over the trainable parameters; `step()` runs and times one training step."""

    def __init__(self, model, ids):
        self.model, self.ids = model, ids
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def run(self):
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed(self):
        start = time.perf_counter()
        self.run()
        return time.perf_counter() - start

    def flops(self):
        with FlopCounterMode(display=False) as counter:
            loss = self.model(input_ids=self.ids, labels=self.ids).loss
            loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops()


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    print(f"# bench_step: GPT-2 {args.n_layer}×{args.n_embd}, {args.n_head} heads, vocab {args.vocab}, context "
          f"{args.context}, batch {args.batch}; rank fractions {args.fractions}; {args.repeats} rounds "
          f"(+{args.warmup} warm-up); threads={torch.get_num_threads()} torch={torch.__version__}; "
          f"load average {' '.join(open('/proc/loadavg').read().split()[:3]) if os.path.exists('/proc/loadavg') else 'n/a'}")
    ids = torch.randint(0, args.vocab, (args.batch, args.context))
    steppers = {name: Stepper(model, ids) for name, model in build_rows(args).items()}
    flops = {name: s.flops() for name, s in steppers.items()}
    names = list(steppers)
    times = {name: [] for name in names}
    for round_index in range(args.warmup + args.repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed = steppers[name].timed()
            if round_index >= args.warmup:
                times[name].append(elapsed)
    t_dense, t_free = statistics.median(times["dense"]), statistics.median(times["free"])
    layer_flops_dense = flops["dense"] - flops["free"]
    rows = []
    header = f"{'row':>12} {'step ms':>9} {'speed-up':>8} {'layer FLOP ratio':>16} {'Amdahl lim':>10} {'% lim':>6}"
    print(header)
    for name in names:
        speedup = statistics.median(d / t for d, t in zip(times["dense"], times[name]))
        ratio = (flops[name] - flops["free"]) / layer_flops_dense
        limit = t_dense / (t_free + (t_dense - t_free) * ratio)
        row = dict(row=name, step_ms=1e3 * statistics.median(times[name]), speedup=speedup,
                   layer_flop_ratio=ratio, amdahl_limit=limit, pct_of_limit=100 * speedup / limit)
        rows.append(row)
        print(f"{name:>12} {row['step_ms']:9.1f} {speedup:7.2f}x {ratio:16.3f} {limit:9.2f}x {row['pct_of_limit']:5.0f}%")
    share = (t_dense - t_free) / t_dense
    print(f"# target layers' share of the dense step: {100 * share:.0f}% (dense {1e3 * t_dense:.0f} ms, "
          f"free {1e3 * t_free:.0f} ms)")
    guarded = [r for r in rows if r["row"] not in ("dense", "free")]
    worst = min(r["pct_of_limit"] for r in guarded)
    print(f"# guard (every factorized row >= 80% of its Amdahl limit): {'met' if worst >= 80 else 'NOT met'} "
          f"(lowest {worst:.0f}%)")
    result = {"args": {k: v for k, v in vars(args).items() if k != "json"}, "rows": rows, "layer_share": share}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print("JSON: " + json.dumps(result))


if __name__ == "__main__":
    main()
