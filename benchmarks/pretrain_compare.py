"""Pretraining frontier: OIALR and InRank against what a user would otherwise pick, on one small GPT-2.

Every row trains the same data with the same seed, optimizer settings and LR schedule, each in its own
subprocess (so peak memory is per row), one after the other:

- `dense`: the GPT-2 at `--n_embd`.
- `dense-small`: a narrower dense GPT-2 (same depth, heads, context, vocabulary; `n_embd` a multiple of
  `n_head`) whose total stored parameters are closest to the final model of the row it matches
  (`--small_match`, default the `oialr` row; per row: `dense-small:match=inrank`).
- `fixed-rank`: the InRank paper's fixed-rank baseline: a fresh model factorized at the final per-layer ranks of
  the row it matches (`--fixed_match`, default `inrank`; per row: `fixed-rank:match=oialr`), by
  `LowRankConfig(method="svd", rank_pattern={layer: rank})`; layers the matched run left dense stay dense.
  svd truncates the random initialization, which loses Frobenius norm (and so activation scale); the
  benchmark then scales each layer's `U` and `V` by sqrt(||W_init||_F / ||U Vᵀ||_F) so that every layer keeps
  its initialization's norm, and trains `U`, `V`.
- `galore`: the dense model with transformers' GaLore optimizer (`optim="galore_adamw"`, package
  `galore-torch`; skipped with the reason when it does not import). transformers' GaLore handles only
  `nn.Linear` and silently skips GPT-2's `Conv1D`, so this row first converts every `Conv1D` into the
  equivalent `nn.Linear` (weight transposed, same bias: the same function, checked on a batch); GaLore then
  projects the gradients of the same layers the low-rank rows factorize. Knobs: `galore:rank=48,
  update_proj_gap=200,scale=0.25,proj_type=std` (defaults: rank n_embd/4, GaLore's own gap and scale).
- `oialr`, `inrank`: `hf_lowrank` with the **library's defaults**; tuned settings are variants,
  `oialr:delay_steps=0.5,sigma_cutoff=0.3` (any `LowRankConfig` knob; values are JSON or plain strings).
  Two levers are benchmark-only knobs of `oialr` rows, measured here before either becomes a library option:
  `sigma_lr_scale=2` (Σ trains at that multiple of the scheduled LR after the conversion) and
  `rewarm_steps=0.02` (after every rank change the LR ramps back linearly over that many steps, or that share
  of the run); see `lever_callback`.

Budgets: `--budget steps` (every row trains `--max_steps` optimizer steps), `--budget time` (every row
trains for the dense row's wall-clock), `--budget both`. Schedules (LR, and knobs given as fractions of the
run) need the total up front, so the time budget does not stop rows on a clock: each row gets
`max_steps × dense seconds / its own seconds at equal steps`, from an equal-steps run made first (or read
from this work dir's `pretrain_results_steps.json` when its setup matches). `dense-small` and `fixed-rank`
keep the architecture chosen in that equal-steps run, whose timing is the one that scales them. The table
shows the wall-clock each row actually took.

Columns: eval perplexity (exp of the held-out loss) and its ratio to dense; train seconds and ratio;
optimizer steps; stored parameters of the whole model and of the target layers (for dense rows, the dense
size of the layers `--target_modules` selects) and ratios to dense; total rank fraction over the target
layers (dense layers count as full rank); peak RSS; tensor memory at the end of training (parameters, one
gradient per trainable parameter, and every tensor of the optimizer state, GaLore's projectors included);
the share of train time spent in rank updates. Writes `pretrain_results_<budget>.json` (all rows),
`pretrain_results_<budget>.md` and a Pareto plot `pretrain_frontier_<budget>.png` into `--work_dir`.

    python benchmarks/pretrain_compare.py                               # all rows, equal steps (~5 min a row, 2 cores)
    python benchmarks/pretrain_compare.py --budget both                 # equal steps, then equal wall-clock
    python benchmarks/pretrain_compare.py --rows dense oialr oialr:delay_steps=0.5,sigma_cutoff=0.3 \\
        dense-small fixed-rank:match=oialr --small_match oialr:delay_steps=0.5,sigma_cutoff=0.3
    python benchmarks/pretrain_compare.py --quick --budget both         # smoke run, tiny sizes

The corpus is the installed standard library's docstrings (`training_scripts/demo_corpus.py`), always
present offline; the tokenizer is trained on its training split and perplexity is measured on held-out files.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

# The demo corpus lives beside the training scripts (it is not shipped in the wheel).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training_scripts"))

KINDS = ("dense", "dense-small", "fixed-rank", "galore", "oialr", "inrank")
LOWRANK_KINDS = ("oialr", "inrank", "fixed-rank")     # rows trained with LowRankTrainer
MATCHING_KINDS = ("dense-small", "fixed-rank")        # rows built from another row's result
GALORE_KNOBS = ("rank", "update_proj_gap", "scale", "proj_type")
# Benchmark-only levers of OIALR rows (measured here before any becomes a library knob): see LeverCallback.
LEVER_KNOBS = ("sigma_lr_scale", "rewarm_steps")
REGEX_CHARS = set("*+?[](){}|^$\\")
# Arguments that do not change what a row measures: an equal-steps JSON written under other values is reusable.
NOT_SETUP = ("budget", "rows", "work_dir", "job")


# --- command line and rows ------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=list(KINDS),
                   help=f"rows to run, among {', '.join(KINDS)}; variants: oialr:sigma_cutoff=0.3,delay_steps=0.5, "
                        "galore:rank=32, fixed-rank:match=oialr")
    p.add_argument("--budget", choices=("steps", "time", "both"), default="steps")
    p.add_argument("--small_match", default="oialr", help="row whose final model size dense-small matches")
    p.add_argument("--fixed_match", default="inrank", help="row whose final ranks fixed-rank trains at")
    p.add_argument("--target_modules", default="all-linear",
                   help="layers to factorize (and GaLore's targets): all-linear, comma-separated suffixes, or a regex")
    p.add_argument("--work_dir", default=None, help="default outputs/pretrain_compare (-quick with --quick)")
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
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps: checks the script runs")
    p.add_argument("--job", help=argparse.SUPPRESS)  # internal: the one row a subprocess trains (JSON)
    args = p.parse_args(argv)
    if args.quick:
        args.n_embd, args.n_layer, args.block_size, args.vocab_size = 64, 2, 64, 1024
        args.batch_size, args.max_steps, args.eval_blocks = 8, 40, 32
    args.work_dir = args.work_dir or ("outputs/pretrain_compare" + ("-quick" if args.quick else ""))
    tm = args.target_modules.strip()
    args.target_modules = tm if tm == "all-linear" or REGEX_CHARS & set(tm) else [s for s in tm.split(",") if s]
    return args


@dataclass
class Row:
    spec: str
    kind: str
    knobs: dict

    def match(self, args) -> str:
        return self.knobs.get("match") or (args.small_match if self.kind == "dense-small" else args.fixed_match)


def literal(text: str):
    """A knob value: JSON (`0.5`, `500`, `true`, `null`) or else the plain string (`c_attn`)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None if text.lower() == "none" else text


def parse_row(spec: str) -> Row:
    """`"oialr:delay_steps=0.5,sigma_cutoff=0.3"` → Row("oialr", {...}); knobs are checked here, before any run."""
    kind, _, overrides = spec.partition(":")
    if kind not in KINDS:
        raise SystemExit(f"Unknown row {kind!r} in {spec!r}: use one of {', '.join(KINDS)}.")
    if kind in MATCHING_KINDS:  # the matched row's spec may itself contain ':' and ','
        if overrides and not overrides.startswith("match="):
            raise SystemExit(f"{spec!r}: {kind} takes only match=<row>.")
        return Row(spec, kind, {"match": overrides[len("match="):]} if overrides else {})
    items = [item for item in re.split(r",(?=\w+=)", overrides) if item]
    if kind == "dense" and items:
        raise SystemExit(f"{spec!r}: the dense row has no knobs.")
    knobs = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"{spec!r}: write knobs as key=value.")
        knobs[key] = literal(value)
    if kind == "galore":
        unknown = set(knobs) - set(GALORE_KNOBS)
        if unknown:
            raise SystemExit(f"{spec!r}: unknown GaLore knobs {sorted(unknown)}; use {', '.join(GALORE_KNOBS)}.")
    elif kind in ("oialr", "inrank"):
        if {"target_modules", "exclude_modules"} & set(knobs):
            raise SystemExit(f"{spec!r}: use --target_modules, so that every row's layer columns compare the same layers.")
        levers = {k: v for k, v in knobs.items() if k in LEVER_KNOBS}
        if levers and kind != "oialr":
            raise SystemExit(f"{spec!r}: {', '.join(LEVER_KNOBS)} are OIALR levers.")
        if not all(isinstance(v, (int, float)) and v > 0 for v in levers.values()):
            raise SystemExit(f"{spec!r}: {', '.join(LEVER_KNOBS)} take a positive number.")
        from hf_lowrank import LowRankConfig

        try:
            LowRankConfig(method=kind, **lowrank_knobs(knobs))
        except (TypeError, ValueError) as error:
            raise SystemExit(f"{spec!r}: {error}") from None
    return Row(spec, kind, knobs)


def lowrank_knobs(knobs: dict) -> dict:
    """A row's `LowRankConfig` knobs: all but the benchmark-only levers."""
    return {k: v for k, v in knobs.items() if k not in LEVER_KNOBS}


def lever_callback(knobs: dict):
    """The TrainerCallback that applies a row's levers (None without any)."""
    from transformers import TrainerCallback

    levers = {k: v for k, v in knobs.items() if k in LEVER_KNOBS}
    if not levers:
        return None

    class LeverCallback(TrainerCallback):
        """Two OIALR levers, applied around the Trainer's LR schedule (a LambdaLR, as every HF schedule):
        - `sigma_lr_scale`: after the conversion, `Σ` trains at this multiple of the scheduled LR (its
          parameters move into their own param groups, which the scheduler then also drives);
        - `rewarm_steps`: after every rank change, the LR of all groups ramps linearly from 1/k back to the
          schedule over the next k optimizer steps (a fraction < 1 means that share of the run)."""

        def __init__(self):
            self.trainer, self.sigma_groups, self.last_change, self.seen = None, set(), None, 0

        def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
            history = self.trainer.lowrank.history
            if len(history) > self.seen and history[-1]["event"] != "start":
                self.last_change = state.global_step
            self.seen = len(history)
            if "sigma_lr_scale" in levers:
                self._separate_sigma(optimizer, lr_scheduler, levers["sigma_lr_scale"])
            k = levers.get("rewarm_steps")
            if k is not None and self.last_change is not None:
                k = max(1, round(k * state.max_steps)) if k < 1 else int(k)
                into = state.global_step + 1 - self.last_change  # the coming step's place in the ramp
                if into <= k:
                    for group in optimizer.param_groups:
                        group["lr"] *= into / k

        def _separate_sigma(self, optimizer, scheduler, scale):
            from hf_lowrank import LowRankLinear

            sigmas = {id(m.S) for m in self.trainer.model.modules()
                      if isinstance(m, LowRankLinear) and m.S is not None and m.S.requires_grad}
            for index, group in enumerate(list(optimizer.param_groups)):
                if index in self.sigma_groups:
                    continue
                moving = [p for p in group["params"] if id(p) in sigmas]
                if not moving:
                    continue
                group["params"] = [p for p in group["params"] if id(p) not in sigmas]
                optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"},
                                           "params": moving, "lr": group["lr"] * scale})
                scheduler.base_lrs.append(scheduler.base_lrs[index] * scale)
                scheduler.lr_lambdas.append(scheduler.lr_lambdas[index])
                scheduler._last_lr.append(group["lr"] * scale)
                self.sigma_groups.add(len(optimizer.param_groups) - 1)

    return LeverCallback()


def resolve_match(name: str, rows: list[Row]) -> Row:
    """The row a matching row follows: the exact spec, else the first row of that kind."""
    for row in rows:
        if row.spec == name:
            return row
    for row in rows:
        if row.kind == name:
            return row
    raise SystemExit(f"Nothing to match: no row {name!r} among {[r.spec for r in rows]}; add it to --rows.")


# --- data and models --------------------------------------------------------------------------------------
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


def build_model(args, n_embd: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=n_embd, n_layer=args.n_layer, n_head=args.n_head,
                                      n_positions=args.block_size, vocab_size=args.vocab_size,
                                      bos_token_id=0, eos_token_id=0))


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied embeddings count once


def closest_width(args, target_params: int) -> int:
    """The narrower n_embd (a multiple of n_head) whose model stores closest to `target_params`."""
    import torch

    with torch.device("meta"):  # shapes only: no memory, no init
        sizes = {w: count_params(build_model(args, w)) for w in range(args.n_head, args.n_embd, args.n_head)}
    return min(sizes, key=lambda w: abs(sizes[w] - target_params))


def target_layers(model, target_modules) -> dict:
    """{name: (dense params, full rank)} of the layers `target_modules` selects, through the public API:
    a throw-away copy is factorized at rank 1 and summarized."""
    from hf_lowrank import LowRankConfig, get_lowrank_model, lowrank_summary

    probe = get_lowrank_model(copy.deepcopy(model), LowRankConfig(method="svd", target_modules=target_modules,
                                                                  rank_fraction=1e-9))
    return {name: (layer.dense_params, layer.max_rank) for name, layer in lowrank_summary(probe).layers.items()}


def conv1d_to_linear(model) -> int:
    """Replace every GPT-2 `Conv1D` (weight in×out) by the same `nn.Linear` (weight out×in); returns how many."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from hf_lowrank.targets import replace_module

    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, Conv1D)]
    for name, conv in convs:
        linear = nn.Linear(conv.nx, conv.nf, bias=conv.bias is not None)
        linear.weight.data.copy_(conv.weight.data.t())
        if conv.bias is not None:
            linear.bias.data.copy_(conv.bias.data)
        replace_module(model, name, linear)
    return len(convs)


def keep_init_norms(model, norms: dict) -> None:
    """Scale U and V of each factorized layer so ||U Vᵀ||_F equals its dense initialization's norm again."""
    import torch

    with torch.no_grad():
        for name, norm in norms.items():
            layer = model.get_submodule(name)
            factor = math.sqrt(norm / layer.weight.norm().item())  # .weight: the dense U Vᵀ
            layer.U.mul_(factor)
            layer.V.mul_(factor)


def tensor_megabytes(model, optimizer) -> float:
    """Parameters + one gradient per trainable parameter + every optimizer-state tensor (also tensors held by
    state objects such as GaLore's projectors). Gradients are counted by size: the Trainer frees them between steps."""
    import torch

    def nbytes(value) -> int:
        if torch.is_tensor(value):
            return value.numel() * value.element_size()
        return sum(nbytes(v) for v in vars(value).values() if torch.is_tensor(v)) if hasattr(value, "__dict__") else 0

    params = list(model.parameters())
    total = sum(nbytes(p) for p in params) + sum(nbytes(p) for p in params if p.requires_grad)
    total += sum(nbytes(v) for state in optimizer.state.values() for v in state.values())
    return total / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forked
    parent through exec, so every row would report at least the parent's size."""
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- one row (runs in its own subprocess) ----------------------------------------------------------------
def run_row(args, job: dict) -> dict:
    import torch
    from transformers import Trainer, TrainingArguments

    from hf_lowrank import LowRankConfig, LowRankLinear, LowRankTrainer, get_lowrank_model

    row = parse_row(job["spec"])
    train, valid = prepare_data(args)
    valid = valid.select(range(min(args.eval_blocks, len(valid))))
    structure, notes, extra_args = dict(job.get("structure", {})), [], {}
    n_embd = args.n_embd
    if row.kind == "dense-small":
        if "n_embd" not in structure:  # equal steps: choose it; time budget: the one chosen then
            structure["n_embd"] = closest_width(args, job["match_params"])
        n_embd = structure["n_embd"]
        notes.append(f"n_embd {n_embd} (matches {row.match(args)})")
    torch.manual_seed(args.seed)
    model = build_model(args, n_embd)
    targets = target_layers(model, args.target_modules)

    if row.kind == "galore":
        try:
            import galore_torch  # noqa: F401  (transformers imports it itself; fail here with the reason)
        except Exception as error:  # ImportError, or a broken bitsandbytes underneath
            return {"skipped": f"galore-torch does not import ({type(error).__name__}: {error}); pip install galore-torch"}
        batch = torch.tensor(valid[0]["input_ids"])[None]
        model.eval()  # no dropout, so the check compares functions (and draws no random numbers)
        with torch.no_grad():
            before = model(batch).logits
            converted = conv1d_to_linear(model)
            drift = (model(batch).logits - before).abs().max().item()
        model.train()
        knobs = {"rank": max(1, args.n_embd // 4), "update_proj_gap": 200, "scale": 0.25, **row.knobs}
        extra_args = {"optim": "galore_adamw", "optim_args": ",".join(f"{k}={v}" for k, v in knobs.items()),
                      # exact names: transformers' "all-linear" would also project the (tied) output head
                      "optim_target_modules": "|".join(re.escape(name) for name in targets)}
        notes.append(f"{converted} Conv1D -> nn.Linear for GaLore (max |logit change| {drift:.1e}); {extra_args['optim_args']}")
    elif row.kind in ("oialr", "inrank"):
        model = get_lowrank_model(model, LowRankConfig(method=row.kind, target_modules=args.target_modules,
                                                       **lowrank_knobs(row.knobs)))
    elif row.kind == "fixed-rank":
        pattern = structure["rank_pattern"]
        norms = {name: model.get_submodule(name).weight.norm().item() for name in pattern}
        model = get_lowrank_model(model, LowRankConfig(method="svd", target_modules=args.target_modules,
                                                       exclude_modules=structure["dense_layers"] or None,
                                                       rank_pattern=pattern))
        keep_init_norms(model, norms)
        notes.append(f"ranks of {row.match(args)}, init norm kept"
                     + (f"; {len(structure['dense_layers'])} layers dense as there" if structure["dense_layers"] else ""))

    training_args = TrainingArguments(
        output_dir=os.path.join(args.work_dir, "runs", re.sub(r"[^\w.=-]+", "_", row.spec)),
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        max_steps=job["max_steps"], learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=0.05,
        weight_decay=0.01, logging_steps=max(1, job["max_steps"] // 10), save_strategy="no", report_to=[],
        use_cpu=True, seed=args.seed, disable_tqdm=True, **extra_args)
    trainer_class = LowRankTrainer if row.kind in LOWRANK_KINDS else Trainer
    trainer = trainer_class(model=model, args=training_args, train_dataset=train, eval_dataset=valid)
    levers = lever_callback(row.knobs)
    if levers is not None:
        levers.trainer = trainer
        trainer.add_callback(levers)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tensor_mb = tensor_megabytes(model, trainer.optimizer)
    eval_loss = trainer.evaluate()["eval_loss"]

    ranks = {}  # final rank per target layer; None where the layer is dense
    for name in targets:
        module = model.get_submodule(name)
        ranks[name] = module.rank if isinstance(module, LowRankLinear) else None
    held = sum(r if r is not None else targets[n][1] for n, r in ranks.items())
    return {
        "spec": row.spec, "kind": row.kind, "max_steps": job["max_steps"], "steps": trainer.state.global_step,
        "eval_loss": eval_loss, "perplexity": math.exp(eval_loss), "train_seconds": seconds,
        "model_params": count_params(model),
        "layer_params": sum(p.numel() for n in targets for p in model.get_submodule(n).parameters()),
        "dense_layer_params": sum(size for size, _ in targets.values()),
        "rank_fraction": held / sum(full for _, full in targets.values()) if row.kind in LOWRANK_KINDS else None,
        "ranks": ranks, "peak_rss_mb": peak_rss_mb(),
        "tensor_mb": tensor_mb,
        "update_seconds": trainer.lowrank.update_seconds if row.kind in LOWRANK_KINDS else None,
        "structure": structure, "notes": notes,
    }


# --- the runs --------------------------------------------------------------------------------------------
def run_subprocess(argv: list[str], job: dict) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--job", json.dumps(job)],
                         capture_output=True, text=True)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        tail = (out.stderr or out.stdout).strip().splitlines()[-12:]
        return {"failed": "\n".join(tail)}
    return json.loads(line[len("RESULT "):])


def match_depth(args, row: Row, rows: list[Row], seen=()) -> int:
    """0 for rows that stand alone, else 1 + the depth of the row they match: the order rows can run in."""
    if row.kind not in MATCHING_KINDS:
        return 0
    if row.spec in seen:
        raise SystemExit(f"Rows match each other in a circle: {' -> '.join(seen + (row.spec,))}.")
    return 1 + match_depth(args, resolve_match(row.match(args), rows), rows, seen + (row.spec,))


def job_for(args, row: Row, rows: list[Row], results: dict, budget: str, equal_steps: dict) -> dict:
    """What the subprocess needs: steps, and for matching rows the structure they copy (or why they cannot run)."""
    job = {"spec": row.spec, "max_steps": args.max_steps}
    if budget == "time":
        dense, own = equal_steps["dense"], equal_steps[row.spec]
        job["max_steps"] = max(1, round(args.max_steps * dense["train_seconds"] / own["train_seconds"]))
        if row.kind in MATCHING_KINDS:  # the architecture the equal-steps timing belongs to
            job["structure"] = own["structure"]
        return job
    if row.kind not in MATCHING_KINDS:
        return job
    ref_spec = resolve_match(row.match(args), rows).spec
    ref = results.get(ref_spec, {})
    if "perplexity" not in ref:
        return {"skipped": f"{ref_spec} did not run"}
    if row.kind == "dense-small":
        job["match_params"] = ref["model_params"]
    else:
        pattern = {name: rank for name, rank in ref["ranks"].items() if rank is not None}
        if not pattern:
            return {"skipped": f"{ref_spec} ended with every target layer dense: no ranks to train at"}
        job["structure"] = {"rank_pattern": pattern, "dense_layers": [n for n, r in ref["ranks"].items() if r is None]}
    return job


def run_budget(args, argv: list[str], rows: list[Row], budget: str, equal_steps: dict = None) -> dict:
    """Every row under one budget; rows that copy another row's result run after it."""
    results = {}
    for row in sorted(rows, key=lambda r: match_depth(args, r, rows)):  # stable: given order otherwise
        job = job_for(args, row, rows, results, budget, equal_steps)
        if "skipped" in job:
            results[row.spec] = job
        else:
            print(f"--- {row.spec}: {job['max_steps']} steps ({budget} budget) ---", flush=True)
            results[row.spec] = run_subprocess(argv, job)
        r = results[row.spec]
        print(f"    {r['failed'] if 'failed' in r else r.get('skipped') or _brief(r)}", flush=True)
    return {spec: results[spec] for spec in (r.spec for r in rows)}  # table in the given order


def _brief(r: dict) -> str:
    return f"eval ppl {r['perplexity']:.2f}, {r['train_seconds']:.1f} s, {r['steps']} steps"


def setup_of(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in NOT_SETUP}


def equal_steps_from_disk(args, rows: list[Row]):
    """A previous equal-steps run in the work dir, if it measured every row with this setup."""
    path = os.path.join(args.work_dir, "pretrain_results_steps.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    ok = saved.get("setup") == setup_of(args) and all("perplexity" in saved["rows"].get(r.spec, {}) for r in rows)
    print(f"{path}: {'reused for the time budget' if ok else 'another setup or rows; running equal steps first'}")
    return saved["rows"] if ok else None


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.job:
        job = json.loads(args.job)
        print("RESULT " + json.dumps(run_row(args, job)), flush=True)
        return
    rows = [parse_row(spec) for spec in args.rows]
    if len({r.spec for r in rows}) != len(rows):
        raise SystemExit("--rows lists a row twice.")
    for row in rows:
        match_depth(args, row, rows)  # fail fast on a missing or circular match
    if args.budget != "steps" and not any(r.spec == "dense" for r in rows):
        raise SystemExit("--budget time needs the dense row: its wall-clock is the budget.")
    os.makedirs(args.work_dir, exist_ok=True)
    prepare_data(args)

    equal_steps = equal_steps_from_disk(args, rows) if args.budget == "time" else None
    if equal_steps is None:
        equal_steps = run_budget(args, argv, rows, "steps")
        report(args, equal_steps, "steps")
    if args.budget != "steps":
        missing = [s for s, r in equal_steps.items() if "perplexity" not in r]
        if "dense" in missing:
            raise SystemExit("The dense row did not run at equal steps: no wall-clock budget to give.")
        timed = run_budget(args, argv, [r for r in rows if r.spec not in missing], "time", equal_steps)
        timed.update({s: {"skipped": "did not run at equal steps"} for s in missing})
        print(f"\nTime budget: {equal_steps['dense']['train_seconds']:.1f} s of training (the dense row at equal steps); "
              "each row's steps scaled by its own equal-steps timing.")
        report(args, timed, "time")


# --- reporting -------------------------------------------------------------------------------------------
def _ratio(key, fmt):
    return lambda r, d: "-" if d is None or r.get(key) is None else format(r[key] / d[key], fmt)


def _value(key, fmt):
    return lambda r, d: "-" if r.get(key) is None else format(r[key], fmt)


COLUMNS = (
    ("row", lambda r, d: r["spec"]),
    ("steps", _value("steps", "d")),
    ("eval ppl", _value("perplexity", ".2f")),
    ("ppl/dense", _ratio("perplexity", ".3f")),
    ("train s", _value("train_seconds", ".1f")),
    ("time/dense", _ratio("train_seconds", ".2f")),
    ("model params", _value("model_params", ",")),
    ("model/dense", _ratio("model_params", ".2f")),
    ("layer params", _value("layer_params", ",")),
    ("layers/dense", _ratio("layer_params", ".2f")),
    ("rank frac", _value("rank_fraction", ".2f")),
    ("peak RSS MB", _value("peak_rss_mb", ".0f")),
    ("tensor MB", _value("tensor_mb", ".1f")),
    ("rank-upd %", lambda r, d: "-" if r.get("update_seconds") is None
        else f"{100 * r['update_seconds'] / r['train_seconds']:.2f}"),
)


def table_cells(results: dict) -> list[list[str]]:
    dense = results.get("dense") if "perplexity" in results.get("dense", {}) else None
    return [[fn(r, dense) for _, fn in COLUMNS] for r in results.values() if "perplexity" in r]


def footnotes(results: dict) -> list[str]:
    lines = [f"{spec}: {note}" for spec, r in results.items() for note in r.get("notes", [])]
    for spec, r in results.items():
        if "perplexity" not in r:
            reason = r.get("skipped") or "failed: " + r["failed"].splitlines()[-1]
            lines.append(f"{spec}: not measured ({reason})")
    return lines


def report(args, results: dict, budget: str) -> None:
    """Plain-text table on stdout; JSON, Markdown table and Pareto plot in the work dir."""
    headers, cells = [h for h, _ in COLUMNS], table_cells(results)
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    align = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    notes = footnotes(results)
    print(f"\n== {'equal optimizer steps' if budget == 'steps' else 'equal wall-clock'} ==")
    print("\n".join([align(headers)] + [align(c) for c in cells] + notes))
    base = os.path.join(args.work_dir, f"pretrain_results_{budget}")
    with open(base + ".json", "w") as f:
        json.dump({"budget": budget, "setup": setup_of(args), "rows": results}, f, indent=2)
    with open(base + ".md", "w") as f:
        md = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
        md += ["| " + " | ".join(c) + " |" for c in cells]
        f.write("\n".join(md) + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "") + "\n")
    plot = plot_frontier({s: r for s, r in results.items() if "perplexity" in r}, budget,
                         os.path.join(args.work_dir, f"pretrain_frontier_{budget}.png"))
    print(f"wrote {base}.json, {base}.md, {plot}")


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (lower is better), by increasing x."""
    front, best = [], math.inf
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def plot_frontier(results: dict, budget: str, path: str) -> str:
    """Perplexity against wall-clock and against model size; points are numbered, the legend names the rows."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 5))
    FigureCanvasAgg(fig)
    markers = "osD^vP*Xhp<>"
    for ax, key, label in zip(fig.subplots(1, 2), ("train_seconds", "model_params"),
                              ("train wall-clock (s)", "stored parameters, whole model")):
        points = [(r[key], r["perplexity"]) for r in results.values()]
        for i, ((x, y), spec) in enumerate(zip(points, results)):
            ax.plot(x, y, markers[i % len(markers)], label=f"{i + 1}: {spec}")
            ax.annotate(str(i + 1), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=9)
        front = pareto(points)
        ax.plot([x for x, _ in front], [y for _, y in front], "--", color="grey", linewidth=1, label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel("eval perplexity")
        ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"GPT-2 pretraining frontier ({'equal steps' if budget == 'steps' else 'equal wall-clock'})")
    fig.tight_layout(rect=(0, 0.06 + 0.035 * math.ceil((len(results) + 1) / 2), 1, 1))
    fig.savefig(path, dpi=120)
    return path


if __name__ == "__main__":
    main()
