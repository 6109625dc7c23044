"""DDP and accelerate's FSDP2 side by side through `LowRankTrainer` on 2+ GPUs: same ranks, same losses.

    python benchmarks/gpu_fsdp2_check.py                      # both methods, all GPUs, 40 steps
    python benchmarks/gpu_fsdp2_check.py --method oialr --num_processes 4 --steps 60

It launches itself with `accelerate launch` once per engine and method: DDP with
training_scripts/accelerate_configs/multi_gpu_bf16.yaml, FSDP2 with fsdp2_gpu.yaml (and HF_LOWRANK_ALLOW_FSDP2=1,
the opt-in this check exists to justify), both overridden to float32 so the losses are comparable. Each run trains
a small GPT-2 (random token ids, fixed seed, the same global batch) with rank changes on an explicit step schedule
and writes its losses and rank history; then the two engines are compared.

Exit status: 0 when every method's ranks are identical and the losses agree within --tolerance, 1 when not, 2 when
the check cannot run here (fewer than 2 CUDA GPUs). On CPU, FSDP2 with rank changes is tested through torch's
`fully_shard` in tests/test_fsdp.py; accelerate's FSDP plugin does nothing on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(os.path.dirname(HERE), "training_scripts", "accelerate_configs")
ENGINES = {"ddp": "multi_gpu_bf16.yaml", "fsdp2": "fsdp2_gpu.yaml"}
# Rank changes early and often, so a short run exercises conversion + cuts (OIALR) and growth + freeze (InRank).
METHODS = {
    "oialr": dict(method="oialr", delay_steps=0.25, update_every=0.125, sigma_cutoff=0.3,
                  rank_pattern={"c_attn|c_proj|c_fc": 0.25}),
    "inrank": dict(method="inrank", init_rank=4, buffer_rank=8, rank_warmup_steps=0.2, check_every=0.1,
                   freeze_step=0.7, explained_ratio=0.9),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=["oialr", "inrank", "both"], default="both")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--num_processes", type=int, default=None, help="default: every visible GPU")
    parser.add_argument("--global_batch", type=int, default=16)
    parser.add_argument("--width", type=int, default=256, help="GPT-2 n_embd")
    parser.add_argument("--layers", type=int, default=4, help="GPT-2 n_layer")
    parser.add_argument("--tolerance", type=float, default=5e-3, help="max |loss difference| allowed")
    parser.add_argument("--out", default=None, help="directory for the runs' records (default: a temp dir)")
    parser.add_argument("--worker", choices=sorted(ENGINES), help=argparse.SUPPRESS)  # set by the launcher
    parser.add_argument("--worker_method", choices=sorted(METHODS), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def worker(args) -> None:
    """One training run inside `accelerate launch`: writes losses and the rank history (process 0)."""
    import torch
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from hf_lowrank import LowRankConfig, LowRankTrainer, get_lowrank_model

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=args.width, n_layer=args.layers, n_head=max(1, args.width // 64),
                                       vocab_size=1024, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0))
    model = get_lowrank_model(model, LowRankConfig(**METHODS[args.worker_method]))
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(0, 1024, (args.steps * args.global_batch, 64), generator=g).tolist()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    training_args = TrainingArguments(
        output_dir=os.path.join(args.out, f"{args.worker}-{args.worker_method}"), max_steps=args.steps,
        per_device_train_batch_size=args.global_batch // world, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", report_to=[], seed=0, disable_tqdm=True, dataloader_drop_last=True)
    trainer = LowRankTrainer(model=model, args=training_args,
                             train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))
    trainer.train()
    if trainer.accelerator.is_main_process:
        record = {"distributed_type": str(trainer.accelerator.distributed_type),
                  "num_processes": trainer.accelerator.num_processes,
                  "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
                  "history": [{"step": h["step"], "event": h["event"], "ranks": h["ranks"]}
                              for h in trainer.lowrank.history]}
        with open(os.path.join(args.out, f"{args.worker}-{args.worker_method}.json"), "w") as f:
            json.dump(record, f)


def launch(args, engine: str, method: str, processes: int) -> dict:
    env = {**os.environ, "HF_LOWRANK_ALLOW_FSDP2": "1" if engine == "fsdp2" else "0"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(CONFIGS, ENGINES[engine]), "--num_processes", str(processes), "--mixed_precision", "no",
           os.path.abspath(__file__), "--worker", engine, "--worker_method", method, "--steps", str(args.steps),
           "--global_batch", str(args.global_batch), "--width", str(args.width), "--layers", str(args.layers),
           "--out", args.out]
    print(f"[{engine} {method}] {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, env=env, check=True)
    with open(os.path.join(args.out, f"{engine}-{method}.json")) as f:
        return json.load(f)


def compare(method: str, ddp: dict, fsdp: dict, tolerance: float) -> bool:
    """Print the comparison of one method's two runs; True when ranks match and losses agree."""
    same_ranks = [(h["step"], h["event"], h["ranks"]) for h in ddp["history"]] == \
                 [(h["step"], h["event"], h["ranks"]) for h in fsdp["history"]]
    gaps = [abs(a - b) for a, b in zip(ddp["losses"], fsdp["losses"])]
    worst = max(gaps) if gaps else float("nan")
    ok = same_ranks and len(ddp["losses"]) == len(fsdp["losses"]) and worst <= tolerance
    print(f"\n{method}: DDP ({ddp['distributed_type']}) vs FSDP2 ({fsdp['distributed_type']}), "
          f"{ddp['num_processes']} processes")
    print(f"  rank events  DDP: {[(h['step'], h['event']) for h in ddp['history']]}")
    print(f"               FSDP2: {[(h['step'], h['event']) for h in fsdp['history']]}")
    print(f"  ranks identical at every event: {same_ranks}")
    print(f"  losses: first {ddp['losses'][0]:.4f} / {fsdp['losses'][0]:.4f}, last {ddp['losses'][-1]:.4f} / "
          f"{fsdp['losses'][-1]:.4f}, max |difference| {worst:.2e} (tolerance {tolerance:.0e})")
    print(f"  {'PASS' if ok else 'FAIL'}")
    return ok


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import torch

    gpus = torch.cuda.device_count()
    processes = args.num_processes or gpus
    if gpus < 2 or processes < 2 or processes > gpus:
        print(f"gpu_fsdp2_check needs at least 2 CUDA GPUs and one process per GPU (found {gpus} GPU(s), asked for "
              f"{processes} processes). Nothing was run. On CPU, FSDP2 with rank changes is tested by "
              "`python -m pytest tests/test_fsdp.py` (torch's fully_shard in a raw loop).", file=sys.stderr)
        return 2
    if args.global_batch % processes:
        print(f"--global_batch {args.global_batch} must be divisible by {processes} processes.", file=sys.stderr)
        return 2
    args.out = args.out or tempfile.mkdtemp(prefix="gpu_fsdp2_check-")
    os.makedirs(args.out, exist_ok=True)
    methods = sorted(METHODS) if args.method == "both" else [args.method]
    results = [compare(m, launch(args, "ddp", m, processes), launch(args, "fsdp2", m, processes), args.tolerance)
               for m in methods]
    print(f"\nrecords in {args.out}")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
