"""What one rank update costs, against layer width, with 1 and 2 processes; and its projected share of training time.

    python benchmarks/update_cost.py                       # widths 256 384 512, 1 and 2 processes
    python benchmarks/update_cost.py --widths 256 512 768 1024 1280 1600 --processes 1 2

Each width is one GPT-2 block (n_embd = width: c_attn width→3·width, attn c_proj, c_fc width→4·width, mlp c_proj)
trained by a raw accelerate loop (AdamW, so surgery carries real moments) with `LowRankController`. Measured, per
update, as the slowest process: `decide` (the method's SVDs / spectrum checks, this process's share), `share`
(gathering the decisions: all_gather_object + one broadcast per process), `surgery` (`apply_changes`: new layers,
optimizer moments mapped), `re-prepare` (DDP re-wrap), `other` (config sync, bookkeeping). Updates:
OIALR conversion (rank 25 % of full, dense SVDs) and a cut (sigma_cutoff 0.9: SVD of Σ, rotation, truncation);
InRank check (spectrum of the cumulative update; growth) and freeze (buffer dropped). Every process runs one
thread, so 1 and 2 processes have the same compute per process; 2 processes are launched with torchrun over gloo.

The projection uses the figures at the largest measured width, scaled to GPT-2 small/medium/large/XL (768/1024/
1280/1600 wide, 12/24/36/48 blocks) with 8 processes, and the default schedules of `LowRankConfig` over a run of
--run_steps optimizer steps; its assumptions are printed with it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

GPT2_SIZES = {"small": (768, 12), "medium": (1024, 24), "large": (1280, 36), "xl": (1600, 48)}
PHASES = ["decide", "share", "surgery", "re-prepare", "other"]
UPDATES = ["oialr conversion", "oialr cut", "inrank check", "inrank freeze"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 384, 512])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="runs per width; the fastest counts")
    parser.add_argument("--run_steps", type=int, default=10_000, help="optimizer steps of the projected run")
    parser.add_argument("--tokens_per_step", type=float, default=0.5e6, help="global tokens per optimizer step")
    parser.add_argument("--mfu", type=float, default=0.5,
                        help="fraction of the measured matmul throughput that training reaches, scenario A")
    parser.add_argument("--gpu_tflops", type=float, default=100.0, help="per-GPU training throughput, scenario B")
    parser.add_argument("--bandwidth", type=float, default=25.0, help="GB/s of a broadcast between GPUs, scenario B")
    parser.add_argument("--out", default=None, help="where workers write their records (default: temp dir)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- measuring (runs in every process) ----------------------------------------------------------------
class Timer:
    """Accumulates wall-clock per phase; wraps the functions the controller calls."""

    def __init__(self):
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def wrap(self, phase, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start
        return timed


def measure_width(width: int, accelerator, repeats: int) -> dict:
    """Times the four updates at one width; returns {update: {phase: seconds}}: the slowest process, the
    fastest of `repeats` runs (each phase separately: the machine is shared)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import hf_lowrank.controller as controller_module
    from hf_lowrank import LowRankConfig, LowRankController, get_lowrank_model

    configs = {
        "oialr": dict(method="oialr", delay_steps=1, update_every=1, sigma_cutoff=0.9,
                      rank_pattern={"c_attn|c_proj|c_fc": 0.25}),
        "inrank": dict(method="inrank", rank_warmup_steps=1, check_every=1, freeze_step=3),
    }
    # InRank's check at step 2 grows the ranks (after one step the cumulative update needs no more components)
    names = {"oialr": {1: "oialr conversion", 2: "oialr cut"}, "inrank": {2: "inrank check", 3: "inrank freeze"}}
    world = accelerator.num_processes
    results = {}
    for method, cfg in [item for item in configs.items() for _ in range(repeats)]:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_embd=width, n_layer=1, n_head=max(1, width // 64), vocab_size=256,
                                           n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
        model = get_lowrank_model(model, LowRankConfig(**cfg))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        wrapped, optimizer = accelerator.prepare(model, optimizer)
        controller = LowRankController(wrapped, optimizer=optimizer, accelerator=accelerator, num_training_steps=10)
        g = torch.Generator().manual_seed(accelerator.process_index)
        for step in range(1, max(names[method]) + 1):
            ids = torch.randint(0, 256, (8 // world, 32), generator=g)
            accelerator.backward(wrapped(input_ids=ids, labels=ids).loss)
            optimizer.step()
            optimizer.zero_grad()
            timer = Timer()
            controller.method.decide = timer.wrap("decide", type(controller.method).decide.__get__(controller.method))
            saved = controller_module.share_changes, controller_module.apply_changes
            shared = []

            def share(*args, **kwargs):
                changes = saved[0](*args, **kwargs)
                shared.extend(changes)
                return changes
            controller_module.share_changes = timer.wrap("share", share)
            controller_module.apply_changes = timer.wrap("surgery", saved[1])
            accelerator.wait_for_everyone()
            start = time.perf_counter()
            try:
                changed = controller.step()
            finally:
                controller_module.share_changes, controller_module.apply_changes = saved
            if changed:
                wrapped = timer.wrap("re-prepare", controller.reprepare)(wrapped)
            total = time.perf_counter() - start
            timer.seconds["other"] = max(0.0, total - sum(timer.seconds.values()))
            if step in names[method]:
                seconds = torch.tensor([timer.seconds[p] for p in PHASES], dtype=torch.float64)
                if world > 1:
                    torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)
                fastest = results.get(names[method][step], dict.fromkeys(PHASES, math.inf))
                results[names[method][step]] = {
                    **{p: min(fastest[p], t) for p, t in zip(PHASES, seconds.tolist())},
                    "bytes": 4 * sum(getattr(c, k).numel() for c in shared for k in ("U", "S", "V", "left", "right")
                                     if getattr(c, k) is not None),
                    "params": sum(p.numel() for p in model.parameters())}
        accelerator.free_memory()
    return results


def matmul_gflops() -> float:
    """This process's fp32 matmul throughput (one thread), for the same-hardware projection."""
    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 1024 ** 3 / (time.perf_counter() - start) / 1e9


def worker(args) -> None:
    import torch
    from accelerate import Accelerator

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    record = {"processes": accelerator.num_processes, "widths": {}}
    for width in args.widths:
        record["widths"][str(width)] = measure_width(width, accelerator, args.repeats)
    if accelerator.is_main_process:
        record["gflops"] = matmul_gflops()
        with open(os.path.join(args.out, f"procs{accelerator.num_processes}.json"), "w") as f:
            json.dump(record, f)


def run(args, processes: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [os.path.abspath(__file__), "--worker", "--out", args.out, "--repeats", str(args.repeats),
              "--widths", *map(str, args.widths)]
    if processes == 1:
        cmd = [sys.executable, *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(29700 + os.getpid() % 200), *common]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(args.out, f"procs{processes}.json")) as f:
        return json.load(f)


# --- reporting ----------------------------------------------------------------------------------------
def print_table(records: dict) -> None:
    print("\nOne update of one GPT-2 block (4 layers), ms, slowest process; 1 thread per process\n")
    print(f"{'width':>6} {'procs':>5} {'update':<17}" + "".join(f"{p:>11}" for p in PHASES) + f"{'total':>10}")
    for width in sorted({int(w) for r in records.values() for w in r["widths"]}):
        for processes, record in sorted(records.items()):
            for update in UPDATES:
                t = record["widths"][str(width)].get(update)
                if t is None:
                    continue
                print(f"{width:>6} {processes:>5} {update:<17}" + "".join(f"{1e3 * t[p]:>11.1f}" for p in PHASES)
                      + f"{1e3 * sum(t[p] for p in PHASES):>10.1f}")


def print_balance(widths) -> None:
    """What spreading can give on one block: the slowest of 2 processes' share of the decision work."""
    shares = ", ".join(f"{w}: {spread_balance(w, 1, 2) / 2:.0%}" for w in sorted(widths))
    print(f"\nWith 2 processes the slowest one decides this share of one block's work (sharding.assign_owners, by "
          f"decision_cost; 4 layers of unequal size): {shares}. Without contention the 2-process `decide` column "
          "would be about that fraction of the 1-process one.")


def schedule_counts(run_steps: int) -> dict:
    """How often each update happens in a run of `run_steps` with the default schedules."""
    from hf_lowrank import LowRankConfig
    from hf_lowrank.methods import resolve_steps

    o = LowRankConfig(method="oialr")
    delay = resolve_steps(o.delay_steps, run_steps, "delay_steps")
    every = resolve_steps(o.update_every, run_steps, "update_every")
    i = LowRankConfig(method="inrank")
    warmup = resolve_steps(i.rank_warmup_steps, run_steps, "rank_warmup_steps")
    check = resolve_steps(i.check_every, run_steps, "check_every")
    freeze = resolve_steps(i.freeze_step, run_steps, "freeze_step")
    last = min(run_steps, freeze or run_steps)
    return {"oialr conversion": int(delay <= run_steps),
            # OIALR's first update happens at the conversion step (it may cut there): count the rest
            "oialr cut": max(0, (run_steps - delay) // every),
            "inrank check": len(range(warmup, last, check)) if warmup < last else 0,
            "inrank freeze": int(freeze is not None and freeze <= run_steps),
            "_text": f"OIALR delay_steps={o.delay_steps}, update_every={o.update_every}; InRank rank_warmup_steps="
                     f"{i.rank_warmup_steps}, check_every={i.check_every}, freeze_step={i.freeze_step}"}


def spread_balance(width: int, blocks: int, processes: int) -> float:
    """Slowest process's decision work over the average, with `sharding.assign_owners` on a GPT-2 of that size
    (built on the meta device: shapes only)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_lowrank.sharding import assign_owners, decision_cost

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(n_embd=width, n_layer=blocks, n_head=width // 64))
    names = [n for n, _ in model.named_modules() if n.endswith(("c_attn", "c_proj", "c_fc"))]
    loads = [0] * processes
    for name, owner in assign_owners(model, names, processes).items():
        loads[owner] += decision_cost(model.get_submodule(name))
    return max(loads) / (sum(loads) / processes)


def projection(records: dict, args) -> None:
    """Share of training time at GPT-2 sizes with 8 processes, from the largest measured width."""
    one, two = records.get(1), records.get(2)
    if one is None or two is None:
        print("\n(projection needs both 1- and 2-process measurements)")
        return
    base = max(int(w) for w in one["widths"])
    counts = schedule_counts(args.run_steps)
    processes, gflops, hops = 8, one["gflops"], math.log2(8)
    print(f"\nProjection: share of training time spent in rank updates, {processes} processes, {args.run_steps} "
          f"optimizer steps, default schedules ({counts['_text']}).")
    print(f"""Assumptions (from the measurements at width {base}, one block):
  compute: the decision (SVDs, spectrum checks) and surgery (new factors, mapped moments) scale as width³ times the
    number of blocks, at the speed measured here (one core per process); decisions are spread over the {processes}
    processes (sharding.assign_owners on the real layer shapes gives the slowest process's load); every process
    does the surgery of every layer.
  communication: A: as measured with 2 gloo processes, the factors' share scaled by bytes (width²) and re-prepare
    by parameters, x{hops:.0f} for an {processes}-process tree; B: the shared factors (bytes measured, scaled by
    width²) and, when parameters changed, the whole fp32 model (DDP's re-prepare broadcast) at {args.bandwidth:g} GB/s.
  step time: 6 · parameters · {args.tokens_per_step:.2g} tokens FLOPs; A: {processes} processes like these
    ({gflops:.1f} GFLOP/s measured fp32 matmul per process, {args.mfu:.0%} of it in training); B: {processes} GPUs at
    {args.gpu_tflops:g} TFLOP/s each, with the update's compute still at the CPU speed measured here (an upper bound).
  Timings are from this machine (run it alone: other jobs inflate them); widths above {base} are extrapolated.
""")
    print(f"{'model':<7} {'width':>5} {'blocks':>6} {'params':>7} {'update':<17} {'compute s':>9} {'comm A s':>8} "
          f"{'comm B s':>8} {'per run':>7} {'share A':>8} {'share B':>8}")
    for size, (width, blocks) in GPT2_SIZES.items():
        params = 12 * blocks * width ** 2 + 50257 * width
        balance = spread_balance(width, blocks, processes)
        cube, square = (width / base) ** 3 * blocks, (width / base) ** 2 * blocks
        step_a = 6 * params * args.tokens_per_step / (processes * gflops * 1e9 * args.mfu)
        step_b = 6 * params * args.tokens_per_step / (processes * args.gpu_tflops * 1e12)
        totals = {}
        for update in UPDATES:
            t1, t2 = one["widths"][str(base)][update], two["widths"][str(base)][update]
            compute = t1["decide"] * cube * balance / processes + t1["surgery"] * cube + t1["other"] * blocks
            reprepared = t2["re-prepare"] > 0
            comm_a = (t2["share"] * square + t2["re-prepare"] * params / t2["params"]) * hops
            comm_b = (t2["bytes"] * square + (4 * params if reprepared else 0)) / (args.bandwidth * 1e9)
            per_run = counts[update]
            share_a = per_run * (compute + comm_a) / (args.run_steps * step_a)
            share_b = per_run * (compute + comm_b) / (args.run_steps * step_b)
            method = update.split()[0]
            totals[method] = [x + y for x, y in zip(totals.get(method, [0, 0]), (share_a, share_b))]
            print(f"{size:<7} {width:>5} {blocks:>6} {params / 1e6:>6.0f}M {update:<17} {compute:>9.2f} {comm_a:>8.2f} "
                  f"{comm_b:>8.2f} {per_run:>7} {share_a:>8.3%} {share_b:>8.3%}")
        for method, (share_a, share_b) in totals.items():
            print(f"{'':<28} {method + ' total':<17} {'':>9} {'':>8} {'':>8} {'':>7} {share_a:>8.3%} {share_b:>8.3%}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    args.out = args.out or tempfile.mkdtemp(prefix="update_cost-")
    records = {}
    for processes in args.processes:
        print(f"measuring with {processes} process(es), widths {args.widths} ...", flush=True)
        records[processes] = run(args, processes)
    print_table(records)
    print_balance(args.widths)
    projection(records, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
