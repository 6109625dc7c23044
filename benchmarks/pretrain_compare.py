"""Dense vs OIALR vs InRank pretraining of the same small GPT-2, side by side in one run.

Same model config, data, steps, seed and optimizer for every method; each method trains in its own
subprocess (so peak memory is per method) one after the other. Prints eval perplexity, wall-clock,
parameters of the factorized layers, peak RSS and ratios to dense, plus the share of training time spent
in rank updates (decision, broadcast, surgery, re-prepare).

    python benchmarks/pretrain_compare.py                 # defaults: ~5 minutes per method on 2 CPU cores
    python benchmarks/pretrain_compare.py --quick         # a smoke run

The corpus is the installed standard library's docstrings (`hf_lowrank.data`), always present offline.
"""

from __future__ import annotations

import os as _os
import sys as _sys

_sys.path.insert(0, _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "training_scripts"))  # demo corpus

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

METHODS = ("dense", "oialr", "inrank")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   help="dense, oialr, inrank; a variant overrides knobs: oialr:sigma_cutoff=0.35,delay_steps=0.3")
    p.add_argument("--work_dir", default="outputs/pretrain_compare")
    p.add_argument("--n_embd", type=int, default=192)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_steps", type=int, default=400)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--eval_blocks", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    # OIALR knobs (fractions of the run)
    p.add_argument("--delay_steps", type=float, default=0.2)
    p.add_argument("--update_every", type=float, default=0.05)
    p.add_argument("--sigma_cutoff", type=float, default=0.2)
    # InRank knobs
    p.add_argument("--init_rank", type=int, default=2)
    p.add_argument("--buffer_rank", type=int, default=16)
    p.add_argument("--explained_ratio", type=float, default=0.9)
    p.add_argument("--rank_warmup_steps", type=float, default=0.05)
    p.add_argument("--check_every", type=float, default=0.02)
    p.add_argument("--freeze_step", type=float, default=0.3)
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps: checks the script runs")
    p.add_argument("--only", help=argparse.SUPPRESS)  # internal: one method per subprocess
    args = p.parse_args(argv)
    if args.quick:
        args.n_embd, args.n_layer, args.block_size, args.vocab_size = 64, 2, 64, 1024
        args.batch_size, args.max_steps, args.eval_blocks, args.buffer_rank = 8, 40, 32, 4
    return args


def prepare_data(args):
    """Tokenizer and block datasets, built once and cached in the work dir."""
    from datasets import Dataset, load_from_disk

    from demo_corpus import train_tokenizer, write_stdlib_corpus

    data_dir = os.path.join(args.work_dir, f"data-v{args.vocab_size}-b{args.block_size}")
    if os.path.isdir(os.path.join(data_dir, "train")):
        return load_from_disk(os.path.join(data_dir, "train")), load_from_disk(os.path.join(data_dir, "validation"))
    train_file, valid_file = write_stdlib_corpus(os.path.join(args.work_dir, "corpus"))
    tokenizer = train_tokenizer([train_file], vocab_size=args.vocab_size)
    tokenizer.save_pretrained(os.path.join(data_dir, "tokenizer"))
    splits = []
    for path in (train_file, valid_file):
        with open(path, encoding="utf-8") as f:
            ids = tokenizer(f.read())["input_ids"]
        blocks = [ids[i:i + args.block_size] for i in range(0, len(ids) - args.block_size + 1, args.block_size)]
        splits.append(Dataset.from_dict({"input_ids": blocks, "labels": blocks}))
    splits[0].save_to_disk(os.path.join(data_dir, "train"))
    splits[1].save_to_disk(os.path.join(data_dir, "validation"))
    return splits


def lowrank_config(args, method):
    from hf_lowrank import LowRankConfig

    if method == "oialr":
        return LowRankConfig(method="oialr", delay_steps=args.delay_steps, update_every=args.update_every,
                             sigma_cutoff=args.sigma_cutoff)
    return LowRankConfig(method="inrank", init_rank=args.init_rank, buffer_rank=args.buffer_rank,
                         explained_ratio=args.explained_ratio, rank_warmup_steps=args.rank_warmup_steps,
                         check_every=args.check_every, freeze_step=args.freeze_step)


def apply_variant(args, spec: str) -> str:
    """`"oialr:sigma_cutoff=0.35"` → sets args.sigma_cutoff = 0.35 and returns `"oialr"`."""
    method, _, overrides = spec.partition(":")
    if method not in METHODS:
        raise SystemExit(f"Unknown method {method!r} in {spec!r}: use one of {METHODS}.")
    for item in filter(None, overrides.split(",")):
        key, _, value = item.partition("=")
        if not hasattr(args, key):
            raise SystemExit(f"Unknown knob {key!r} in {spec!r}.")
        setattr(args, key, type(getattr(args, key))(value))
    return method


def run_one(args, spec):
    """Train one method (or variant); returns its measurements."""
    method = apply_variant(args, spec)
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from hf_lowrank import LowRankTrainer, get_lowrank_model, lowrank_summary
    from hf_lowrank.inject import find_targets

    train, valid = prepare_data(args)
    valid = valid.select(range(min(args.eval_blocks, len(valid))))
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(GPT2Config(n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head,
                                       n_positions=args.block_size, vocab_size=args.vocab_size,
                                       bos_token_id=0, eos_token_id=0))
    from hf_lowrank import LowRankConfig

    targets = find_targets(model, LowRankConfig(method="svd"))
    dense_layer_params = sum(p.numel() for n in targets for p in model.get_submodule(n).parameters())
    training_args = TrainingArguments(
        output_dir=os.path.join(args.work_dir, spec.replace(":", "_").replace(",", "_")), per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, max_steps=args.max_steps, learning_rate=args.learning_rate,
        lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.01, logging_steps=max(1, args.max_steps // 10),
        save_strategy="no", report_to=[], use_cpu=True, seed=args.seed, disable_tqdm=True)
    if method == "dense":
        trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=valid)
    else:
        model = get_lowrank_model(model, lowrank_config(args, method))
        trainer = LowRankTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=valid)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    eval_loss = trainer.evaluate()["eval_loss"]
    summary = lowrank_summary(model)
    layer_params = summary.params if summary.layers else dense_layer_params
    result = {
        "method": spec, "perplexity": math.exp(eval_loss), "eval_loss": eval_loss, "train_seconds": wall,
        "factorized_layer_params": layer_params, "dense_layer_params": dense_layer_params,
        "model_params": sum(p.numel() for p in model.parameters()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rank_update_seconds": getattr(getattr(trainer, "lowrank", None), "update_seconds", 0.0),
        "rank_fraction": summary.rank_fraction if summary.layers else 1.0,
    }
    return result


def main(argv=None):
    args = parse_args(argv)
    if args.only:
        print("RESULT " + json.dumps(run_one(args, args.only)), flush=True)
        return
    os.makedirs(args.work_dir, exist_ok=True)
    prepare_data(args)
    results = {}
    for method in args.methods:
        apply_variant(parse_args([]), method)  # fail fast on a bad spec
        cmd = [sys.executable, __file__, "--only", method] + (argv if argv is not None else sys.argv[1:])
        print(f"--- {method} ---", flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{method} failed:\n{out.stderr[-3000:]}")
        line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
        results[method] = json.loads(line[len("RESULT "):])
    print_table(results)
    with open(os.path.join(args.work_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)


def print_table(results):
    dense = results.get("dense")
    width = max(8, *(len(m) for m in results))
    header = (f"{'method':<{width}} {'eval ppl':>9} {'ppl/dense':>9} {'train s':>8} {'time/dense':>10} "
              f"{'layer params':>12} {'params/dense':>12} {'rank frac':>9} {'peak RSS MB':>11} {'rank-update %':>13}")
    print(header)
    for method, r in results.items():
        ppl_ratio = r["perplexity"] / dense["perplexity"] if dense else float("nan")
        time_ratio = r["train_seconds"] / dense["train_seconds"] if dense else float("nan")
        params_ratio = r["factorized_layer_params"] / r["dense_layer_params"]
        update_share = 100 * r["rank_update_seconds"] / r["train_seconds"]
        print(f"{method:<{width}} {r['perplexity']:>9.2f} {ppl_ratio:>9.3f} {r['train_seconds']:>8.1f} {time_ratio:>10.2f} "
              f"{r['factorized_layer_params']:>12,} {params_ratio:>12.2f} {r['rank_fraction']:>9.2f} "
              f"{r['peak_rss_mb']:>11.0f} {update_share:>13.2f}")


if __name__ == "__main__":
    main()
