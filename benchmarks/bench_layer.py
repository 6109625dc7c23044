"""Forward+backward throughput of `LowRankLinear` vs `nn.Linear` and GPT-2's `Conv1D`, in one run.

For each GPT-2-small-like shape, every layer (dense `nn.Linear`, dense `Conv1D`, and `LowRankLinear` at each
rank fraction and variant) is built once; the timed repetitions are *interleaved*: each round runs one fwd+bwd
of every layer, in a rotating order, with a dense `nn.Linear` call between any two, after a warm-up round.
Times are medians over the rounds. The speed-up is the median over rounds of (mean of the two dense calls
around a call) / (that call): machines shared with other jobs drift by seconds, and adjacent calls see
the same load.
Each timed call is `y = layer(x); y.backward(dy)` with `x.requires_grad=True` (as for any layer inside a
network, so the input gradient is part of the cost). Gradients are dropped between calls (outside the
timing) so no call pays for gradient accumulation.

Variants:
  sigma    OIALR: `W = U S Vᵀ`, `S` trains, `U` and `V` frozen
  nosigma  svd / InRank: `W = U Vᵀ`, `U` and `V` train

The FLOP-ratio limit is dense FLOPs / factorized FLOPs of the path the layer actually took, both counted with
`torch.utils.flop_counter.FlopCounterMode` over one real fwd+bwd call (so it counts what ran, not a model).
"%lim" is the measured speed-up as a percentage of that limit.

Not in the FLOP count, but in the time: memory-bound work both paths share (the bias, `db = dy.sum(0)`, and
first-touch page faults of fresh outputs: with glibc, tensors above ~32 MB, like a 4096×3072 fp32 output, are
fresh `mmap`s every call, ~13 ms per 50 MB here). It weighs more on the faster factorized call, so "% lim"
below 100% at small ranks is partly this fixed cost (PyTorch's `THP_MEM_ALLOC_ENABLE=1` reduces it).

    python benchmarks/bench_layer.py                 # full run (~2 min on an idle 2-core box)
    python benchmarks/bench_layer.py --quick         # short run
    python benchmarks/bench_layer.py --variant sigma --tokens 2048 --json results.json

The last line printed is `JSON: {...}` with every row (also written to `--json PATH` if given).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers.pytorch_utils import Conv1D

from hf_lowrank.layers import LowRankLinear

DEFAULT_SHAPES = ["768x768", "768x2304", "768x3072", "3072x768"]  # in x out: attn proj, qkv, mlp up, mlp down
DEFAULT_FRACTIONS = [1.0, 0.5, 0.25, 0.1]
VARIANTS = {"sigma": True, "nosigma": False}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=None,
                   help="rows of the input (batch × sequence); default 4096 (8×512), 1024 with --quick")
    p.add_argument("--shapes", nargs="+", default=None, metavar="INxOUT",
                   help=f"layer shapes in_features x out_features (default: {' '.join(DEFAULT_SHAPES)})")
    p.add_argument("--fractions", nargs="+", type=float, default=None,
                   help=f"rank fractions of min(in, out) (default: {DEFAULT_FRACTIONS})")
    p.add_argument("--variant", choices=["both", "sigma", "nosigma"], default="both",
                   help="sigma: OIALR (S trains, U/V frozen); nosigma: svd/InRank (U, V train); default both")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per layer (median); default 5, 3 quick")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first; default 1")
    p.add_argument("--autocast", choices=["none", "bf16"], default="none",
                   help="run under torch.autocast('cpu', dtype=torch.bfloat16)")
    p.add_argument("--quick", action="store_true",
                   help="short run: 1024 tokens, shapes 768x768 and 768x3072, fractions 1.0 and 0.25, 3 rounds")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON to PATH")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.tokens = args.tokens or (1024 if args.quick else 4096)
    args.shapes = args.shapes or (["768x768", "768x3072"] if args.quick else DEFAULT_SHAPES)
    args.fractions = args.fractions or ([1.0, 0.25] if args.quick else DEFAULT_FRACTIONS)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else 1
    return args


def parse_shape(text):
    try:
        n_in, n_out = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"bad --shapes entry {text!r}: expected IN x OUT like 768x3072")
    return n_in, n_out


def autocast_ctx(mode):
    if mode == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fwd_bwd(layer, x, dy, mode):
    with autocast_ctx(mode):
        y = layer(x)
    y.backward(dy.to(y.dtype))


def clear_grads(layer, x):
    x.grad = None
    for p in layer.parameters():
        p.grad = None


def count_flops(layer, x, dy, mode):
    clear_grads(layer, x)
    with FlopCounterMode(display=False) as counter:
        fwd_bwd(layer, x, dy, mode)
    clear_grads(layer, x)
    return counter.get_total_flops()


def time_once(layer, x, dy, mode):
    clear_grads(layer, x)
    t0 = time.perf_counter()
    fwd_bwd(layer, x, dy, mode)
    elapsed = time.perf_counter() - t0
    clear_grads(layer, x)
    return elapsed


def bench_shape(n_in, n_out, args, variants):
    torch.manual_seed(args.seed)
    linear = nn.Linear(n_in, n_out)
    conv = Conv1D(n_out, n_in)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.t())
        conv.bias.copy_(linear.bias)
    layers = {("dense", "linear", None): linear, ("dense", "conv1d", None): conv}
    max_rank = min(n_in, n_out)
    for variant in variants:
        for frac in args.fractions:
            rank = max(1, round(frac * max_rank))
            layers[("lowrank", variant, frac)] = LowRankLinear.from_dense(
                linear, rank, has_sigma=VARIANTS[variant])
    x = torch.randn(args.tokens, n_in, requires_grad=True)
    dy = torch.randn(args.tokens, n_out)
    keys = list(layers)
    dense_key, conv_key = ("dense", "linear", None), ("dense", "conv1d", None)
    flops = {k: count_flops(layers[k], x, dy, args.autocast) for k in keys}
    others = [k for k in keys if k != dense_key]
    times = {k: [] for k in keys}
    ratios = {k: [] for k in others}
    for round_ in range(args.warmup + args.repeats):
        shift = round_ % len(others)  # rotate the order so no layer always runs at the same point of a round
        t_dense = time_once(linear, x, dy, args.autocast)
        timed = round_ >= args.warmup
        if timed:
            times[dense_key].append(t_dense)
        for k in others[shift:] + others[:shift]:
            t = time_once(layers[k], x, dy, args.autocast)
            t_next = time_once(linear, x, dy, args.autocast)
            if timed:  # pair each call with the dense calls right before and after it: robust to slow drift
                times[k].append(t)
                times[dense_key].append(t_next)
                ratios[k].append(0.5 * (t_dense + t_next) / t)
            t_dense = t_next
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    rows = []
    for k in keys:
        if k[0] != "lowrank":
            continue
        layer = layers[k]
        speedup = statistics.median(ratios[k])
        limit = flops[dense_key] / flops[k]
        rows.append({
            "shape": f"{n_in}x{n_out}", "in": n_in, "out": n_out, "tokens": args.tokens,
            "variant": k[1], "fraction": k[2], "rank": layer.rank,
            "path": "chain" if layer.chain_is_cheaper(args.tokens) else "materialized",
            "trainable": layer.trainable_factors(),
            "dense_ms": med[dense_key], "conv1d_ms": med[conv_key], "lowrank_ms": med[k],
            "speedup": speedup, "speedup_vs_conv1d": med[conv_key] / med[k],
            "conv1d_speedup_paired": statistics.median(ratios[conv_key]),
            "flops_dense": flops[dense_key], "flops_lowrank": flops[k],
            "flop_limit": limit, "pct_of_limit": 100.0 * speedup / limit,
            "lowrank_times_ms": [t * 1e3 for t in times[k]],
            "dense_times_ms": [t * 1e3 for t in times[dense_key]],
        })
    return rows


HEADER = (f"{'shape':>9} {'variant':>7} {'frac':>5} {'rank':>5} {'path':>12} {'dense ms':>9} {'conv1d ms':>9} "
          f"{'lowrank ms':>10} {'speed-up':>8} {'FLOP lim':>8} {'% lim':>6}")


def fmt(row):
    return (f"{row['shape']:>9} {row['variant']:>7} {row['fraction']:>5.2f} {row['rank']:>5} {row['path']:>12} "
            f"{row['dense_ms']:>9.1f} {row['conv1d_ms']:>9.1f} {row['lowrank_ms']:>10.1f} "
            f"{row['speedup']:>7.2f}x {row['flop_limit']:>7.2f}x {row['pct_of_limit']:>5.0f}%")


def summarize(rows):
    """The issue's two targets, checked on this run's rows."""
    out = {}
    quarter = [r for r in rows if abs(r["fraction"] - 0.25) < 1e-9]
    if quarter:
        worst = min(quarter, key=lambda r: r["pct_of_limit"])
        out["rank_0.25_min_pct_of_limit"] = worst["pct_of_limit"]
        out["rank_0.25_target_met (>=80%)"] = worst["pct_of_limit"] >= 80.0
    full = [r for r in rows if abs(r["fraction"] - 1.0) < 1e-9]
    if full:
        worst = min(full, key=lambda r: r["speedup"])
        out["full_rank_max_slowdown"] = 1.0 / worst["speedup"]
        out["full_rank_target_met (<=1.10x dense)"] = 1.0 / worst["speedup"] <= 1.10
    return out


def main(argv=None):
    args = parse_args(argv)
    variants = ["sigma", "nosigma"] if args.variant == "both" else [args.variant]
    shapes = [parse_shape(s) for s in args.shapes]
    load = " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else "n/a"
    print(f"# bench_layer: load average at start {load} (other jobs on the machine make timings noisy)")
    print(f"# bench_layer: tokens={args.tokens} variants={variants} fractions={args.fractions} "
          f"rounds={args.repeats} (+{args.warmup} warm-up) autocast={args.autocast} "
          f"torch={torch.__version__} threads={torch.get_num_threads()} python={platform.python_version()}")
    print("# dense = nn.Linear; ms = median fwd+bwd time; speed-up = median over rounds of (mean of the dense calls "
          "right before and after) / lowrank call;\n# FLOP lim = dense FLOPs / lowrank FLOPs (fwd+bwd, counted on "
          "the path taken); % lim = speed-up / FLOP lim")
    print(HEADER)
    sys.stdout.flush()
    rows = []
    t0 = time.perf_counter()
    for n_in, n_out in shapes:
        shape_rows = bench_shape(n_in, n_out, args, variants)
        for row in shape_rows:
            print(fmt(row))
        sys.stdout.flush()
        rows.extend(shape_rows)
    summary = summarize(rows)
    for key, value in summary.items():
        print(f"# {key}: {value:.3f}" if isinstance(value, float) and not isinstance(value, bool)
              else f"# {key}: {value}")
    load = " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else "n/a"
    print(f"# wall time {time.perf_counter() - t0:.0f} s; load average at end {load}")
    result = {"args": {k: v for k, v in vars(args).items()}, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "summary": summary, "rows": rows}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    slim = dict(result, rows=[{k: v for k, v in r.items() if not k.endswith("times_ms")} for r in rows])
    print("JSON: " + json.dumps(slim))
    return result


if __name__ == "__main__":
    main()
