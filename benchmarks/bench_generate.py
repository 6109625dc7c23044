"""Generation speed of a factorized GPT-2 against dense: tokens/s and per-token latency of `model.generate`.

Greedy decoding with the KV cache, a fixed number of new tokens (`min_new_tokens = max_new_tokens`, no eos),
at batch 1 and batch 16, for these rows built from one random-weight GPT-2 (random weights time the same):

  dense       the GPT-2 itself
  as-trained  OIALR's training form at rank fraction r in every attention and MLP layer: `U Σ Vᵀ`, Σ trainable
  use form    `hf_lowrank.to_use_form`: Σ folded into a factor, `r·(in+out)` per layer (skipped if absent)
  merged      `hf_lowrank.merge_and_unload`: dense again

Timing is interleaved: each round runs one `generate` per row in a rotating order, after warm-up rounds; the
table shows medians over rounds, and the speed-up is the median over rounds of dense time / row time in the
same round (machines shared with other jobs drift; calls in one round see the same load). Everything runs
under `torch.inference_mode()`.

"FLOP lim" is the speed-up the row's FLOPs allow: dense FLOPs of one `generate` (counted with
`FlopCounterMode`) / the same with each factorized layer costing what its form needs per token at the best
association (`r·(in+out)`, plus `r²` with Σ), everything else (embeddings, attention, head) as counted.
"% lim" = speed-up / FLOP lim. "ran/need" = FLOPs counted over the row's real call / that ideal count:
above 1.00 the layers computed more than their form needs.

    python benchmarks/bench_generate.py                    # n_embd 768, 4 layers, vocab 8192, prompt 32, 64 new
    python benchmarks/bench_generate.py --quick            # smoke run
    python benchmarks/bench_generate.py --fraction 0.1 --batch-sizes 1 16 --json results.json
    python benchmarks/bench_generate.py --threads 1        # steadier on a machine shared with other jobs
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel

import hf_lowrank
from hf_lowrank import LowRankConfig, LowRankLinear, get_lowrank_model, lowrank_summary
from hf_lowrank.layers import linear_shape

TARGETS = ("c_attn", "c_proj", "c_fc")  # every attention and MLP layer of GPT-2; the head stays dense


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fraction", type=float, default=0.25, help="rank fraction r of every target layer")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--n-layer", type=int, default=None, help="default 4, 2 with --quick")
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--prompt-length", type=int, default=None, help="default 32, 16 with --quick")
    p.add_argument("--new-tokens", type=int, default=None, help="default 64, 16 with --quick")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (median); default 5, 2 with --quick")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 layers, 16+16 tokens, 2 rounds")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON to PATH")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    quick = args.quick
    args.n_layer = args.n_layer or (2 if quick else 4)
    args.prompt_length = args.prompt_length or (16 if quick else 32)
    args.new_tokens = args.new_tokens or (16 if quick else 64)
    args.repeats = args.repeats or (2 if quick else 5)
    return args


def load_average():
    return " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else "n/a"


def build_rows(args):
    """name -> model, all the same function (up to float rounding)."""
    torch.manual_seed(args.seed)
    dense = GPT2LMHeadModel(GPT2Config(
        n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head, vocab_size=args.vocab,
        n_positions=args.prompt_length + args.new_tokens, bos_token_id=None, eos_token_id=None)).eval()
    r = args.fraction
    # sigma_cutoff=0 and delay_steps=0: converted at injection, at exactly the rank_pattern's fraction
    trained = get_lowrank_model(copy.deepcopy(dense), LowRankConfig(
        method="oialr", delay_steps=0, sigma_cutoff=0.0, rank_pattern={t: r for t in TARGETS})).eval()
    rows = {"dense": dense, "as-trained": trained}
    if hasattr(hf_lowrank, "to_use_form"):
        rows["use form"] = hf_lowrank.to_use_form(copy.deepcopy(trained)).eval()
    else:
        print("# hf_lowrank.to_use_form not available: 'use form' row skipped")
    rows["merged"] = hf_lowrank.merge_and_unload(copy.deepcopy(trained)).eval()
    return rows


def check_ranks(model, fraction):
    """Print the ranks the as-trained model got; they should all be `fraction` of full rank."""
    summary = lowrank_summary(model)
    off = {n: f"{l.rank}/{l.max_rank}" for n, l in summary.layers.items()
           if l.rank != max(1, round(fraction * l.max_rank))}
    print(f"# as-trained: {len(summary.layers)} factorized layers, rank fraction {summary.rank_fraction:.3f}"
          + (f"; NOT all at {fraction}: {off}" if off else f" (every layer at {fraction})"))


def generate(model, ids, new_tokens):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + new_tokens, "generate stopped early: rows would not be comparable"
    return out


def layer_tokens(model, ids, new_tokens):
    """FLOPs of one `generate` and, per target layer name, the rows (tokens) it multiplied."""
    tokens = {}

    def count(name):
        def hook(module, inputs):
            tokens[name] = tokens.get(name, 0) + inputs[0].numel() // linear_shape(module)[0]
        return hook

    hooks = [m.register_forward_pre_hook(count(n)) for n, m in model.named_modules()
             if n.rsplit(".", 1)[-1] in TARGETS]
    with FlopCounterMode(display=False) as counter:
        generate(model, ids, new_tokens)
    for h in hooks:
        h.remove()
    return counter.get_total_flops(), tokens


def per_token_cost(module):
    """Multiply-adds per input row that the layer's form needs at its best association."""
    n_in, n_out = linear_shape(module)
    if not isinstance(module, LowRankLinear):
        return n_in * n_out
    return module.rank * (n_in + n_out) + (module.rank ** 2 if module.S is not None else 0)


def needed_flops(model, dense_flops, tokens):
    """Dense FLOPs with each target layer's share replaced by what the row's layer form needs."""
    flops = dense_flops
    for name, t in tokens.items():
        n_in, n_out = linear_shape(model.get_submodule(name))
        flops += 2 * t * (per_token_cost(model.get_submodule(name)) - n_in * n_out)
    return flops


def bench_batch(rows, batch, args):
    ids = torch.randint(0, args.vocab, (batch, args.prompt_length), generator=torch.Generator().manual_seed(args.seed))
    dense_flops, tokens = layer_tokens(rows["dense"], ids, args.new_tokens)
    names = list(rows)
    times = {n: [] for n in names}
    ratios = {n: [] for n in names}
    for round_ in range(args.warmup + args.repeats):
        shift = round_ % len(names)  # rotate so no row always runs first (or right after the same row)
        t = {}
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            generate(rows[name], ids, args.new_tokens)
            t[name] = time.perf_counter() - start
        if round_ >= args.warmup:
            for name in names:
                times[name].append(t[name])
                ratios[name].append(t["dense"] / t[name])
    out = []
    for name, model in rows.items():
        ran = dense_flops if name == "dense" else layer_tokens(model, ids, args.new_tokens)[0]
        need = needed_flops(model, dense_flops, tokens)
        med = statistics.median(times[name])
        speedup, limit = statistics.median(ratios[name]), dense_flops / need
        out.append({
            "batch": batch, "row": name, "factorized": any(isinstance(m, LowRankLinear) for m in model.modules()),
            "ms_per_token": 1e3 * med / args.new_tokens, "tokens_per_s": batch * args.new_tokens / med,
            "speedup": speedup, "flop_limit": limit, "pct_of_limit": 100.0 * speedup / limit,
            "flops_ran": ran, "flops_needed": need, "ran_over_needed": ran / need,
            "times_s": times[name],
        })
    return out


HEADER = (f"{'batch':>5} {'row':>10} {'ms/token':>9} {'tokens/s':>9} {'speed-up':>8} {'FLOP lim':>8} {'% lim':>6} "
          f"{'ran/need':>8}")


def fmt(row):
    return (f"{row['batch']:>5} {row['row']:>10} {row['ms_per_token']:>9.2f} {row['tokens_per_s']:>9.1f} "
            f"{row['speedup']:>7.2f}x {row['flop_limit']:>7.2f}x {row['pct_of_limit']:>5.0f}% "
            f"{row['ran_over_needed']:>7.2f}x")


def summarize(rows, batch_sizes):
    """The design targets, per factorized row, on this run's numbers."""
    out = {}
    for row in (r for r in rows if r["factorized"]):
        if row["batch"] == max(batch_sizes) and row["batch"] > 1:
            out[f"{row['row']}: batch {row['batch']} >= 80% of FLOP lim"] = row["pct_of_limit"] >= 80.0
        if row["batch"] == 1:
            out[f"{row['row']}: batch 1 not slower than dense"] = row["speedup"] >= 1.0
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# bench_generate: load average at start {load_average()} (other jobs on the machine make timings noisy)")
    print(f"# GPT-2 n_embd={args.n_embd} n_layer={args.n_layer} n_head={args.n_head} vocab={args.vocab}; "
          f"prompt {args.prompt_length}, {args.new_tokens} new tokens (greedy, KV cache); rank fraction "
          f"{args.fraction}; rounds={args.repeats} (+{args.warmup} warm-up); torch={torch.__version__} "
          f"threads={torch.get_num_threads()}")
    print("# ms/token = median generate time / new tokens (one decoding step, prefill included); speed-up = median over rounds of dense / row time;\n"
          "# FLOP lim = dense FLOPs / FLOPs the row's layer forms need; % lim = speed-up / FLOP lim; "
          "ran/need = FLOPs that ran / needed")
    t0 = time.perf_counter()
    models = build_rows(args)  # outside inference mode: conversion makes Parameters
    check_ranks(models["as-trained"], args.fraction)
    print(HEADER, flush=True)
    with torch.inference_mode():
        rows = []
        for batch in args.batch_sizes:
            batch_rows = bench_batch(models, batch, args)
            for row in batch_rows:
                print(fmt(row), flush=True)
            rows.extend(batch_rows)
    summary = summarize(rows, args.batch_sizes)
    for key, met in summary.items():
        print(f"# target {key}: {'met' if met else 'NOT met'}")
    print(f"# wall time {time.perf_counter() - t0:.0f} s; load average at end {load_average()}")
    result = {"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "summary": summary, "rows": rows}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
