#!/usr/bin/env python
"""Regenerate the reference model cards in `model_cards/` from real runs of the training scripts.

    python model_cards/regenerate.py            # the five reference runs, then their cards (long: see below)
    python model_cards/regenerate.py --quick    # tiny models, a few steps: checks that everything runs
    python model_cards/regenerate.py --only gpt2-oialr gpt2-dense

Each run is an ordinary command line of `training_scripts/` (printed, and logged in `WORK/logs/`), offline:

- `gpt2-oialr`  the main job: `run_clm.py`'s demo (GPT-2, 4 layers, width 192, stdlib docstrings, OIALR).
- `gpt2-dense`  its dense twin: the same run with `--lowrank_method none`.
- `gpt2-inrank` the same model and data with InRank (the library's defaults).
- `bert-svd-finetune` a BERT fine-tune compressed by one-shot SVD, `vit-oialr-finetune` a ViT fine-tune with OIALR.
  No pretrained BERT or ViT can be downloaded here, so each starts from a small dense model that this script trains
  first on a related task of the same data (BERT: the topic of a standard-library docstring among other packages;
  ViT: the kind of shape in a synthetic image), then fine-tunes on the target task (the topic among new packages;
  how many shapes an image holds) with a new classification head, as a user fine-tunes a Hub checkpoint.
  `--bert_base` / `--vit_base` fine-tune a given checkpoint instead (a local directory, or a Hub id when online).

After each run the card is rewritten with `hf_lowrank.hub.save_model_card` from the saved model directory (so its
figures are those of the model as saved), checked against that model's `lowrank_summary`, and copied with its
plots and `lowrank_summary.json` into `model_cards/<name>/`; `model_cards/README.md` indexes them. With `--quick`
the cards go to `WORK/model_cards/` unless `--dest` says otherwise, so a check never replaces the reference cards.
On 2 idle CPU cores the full regeneration takes on the order of an hour.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCRIPTS = ROOT / "training_scripts"
CARDS = ("gpt2-oialr", "gpt2-dense", "gpt2-inrank", "bert-svd-finetune", "vit-oialr-finetune")
SUMMARY_NAME = "lowrank_summary.json"
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
COMMAND = "python model_cards/regenerate.py"

# run_clm.py's demo (training_scripts/run_clm.py::DEMO_ARGS) without its method: the GPT-2 runs share it.
GPT2_MODEL = ["--model_type", "gpt2", "--config_overrides",
              "n_embd=192,n_layer=4,n_head=4,n_positions=128,resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0",
              "--train_tokenizer_vocab_size", "4096", "--block_size", "128"]
GPT2_TRAINING = ["--num_train_epochs", "2", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32",
                 "--learning_rate", "2e-3", "--lr_scheduler_type", "cosine", "--warmup_steps", "0.05",
                 "--weight_decay", "0.01", "--logging_steps", "25"]
GPT2_QUICK = ["--model_type", "gpt2", "--config_overrides",
              "n_embd=64,n_layer=2,n_head=2,n_positions=64,resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0",
              "--train_tokenizer_vocab_size", "512", "--block_size", "32"]
QUICK_TRAINING = ["--max_steps", "8", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
                  "--max_train_samples", "64", "--max_eval_samples", "16", "--learning_rate", "2e-3",
                  "--logging_steps", "4"]
COMMON = ["--do_train", "--do_eval", "--save_strategy", "no", "--report_to", "none", "--log_level", "warning",
          "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--seed", "42"]


@dataclass
class Run:
    """One command line of a training script; `card` runs are reference cards, the others their base models."""

    name: str
    script: str
    args: list[str]
    description: str = ""
    card: bool = True
    needs: list[str] = field(default_factory=list)  # runs whose output this one starts from

    @property
    def output_dir(self) -> Path:
        return Path(self.args[self.args.index("--output_dir") + 1])

    def command(self, work: Optional[Path] = None) -> str:
        """The command line; with `work`, its paths are written relative to `$WORK` (the --work_dir)."""
        line = " ".join([f"python training_scripts/{self.script}", *self.args])
        return line.replace(str(work), "$WORK") if work is not None else line


# --- data (offline, deterministic) ----------------------------------------------------------------------------
def _package_docstrings() -> dict[str, list[str]]:
    """Docstrings of the standard library, grouped by top-level package (private modules left out)."""
    sys.path.insert(0, str(SCRIPTS))
    from demo_corpus import _docstrings, _stdlib_files

    root = Path(sysconfig.get_paths()["stdlib"])
    groups: dict[str, list[str]] = {}
    for path in _stdlib_files():
        package = path.relative_to(root).parts[0].removesuffix(".py")
        if not package.startswith("_"):
            groups.setdefault(package, []).extend(" ".join(doc.split()) for doc in _docstrings(path))
    return groups


def write_topic_data(directory: Path, quick: bool) -> dict[str, tuple[Path, Path]]:
    """Two text-classification tasks of standard-library docstrings (label: the package a docstring is from), on
    disjoint sets of packages: `base` (the base model's training) and `finetune` (the target task). The 14
    packages with the most docstrings alternate between the two; every 5th docstring is held out for validation."""
    groups = _package_docstrings()
    largest = sorted(groups, key=lambda p: (-len(groups[p]), p))[:14]
    tasks = {"finetune": largest[0::2], "base": largest[1::2]}
    paths = {}
    for task, packages in tasks.items():
        rows = {"train": [], "validation": []}
        for package in packages:
            docs = groups[package][: 40 if quick else None]
            for i, doc in enumerate(docs):
                rows["validation" if i % 5 == 4 else "train"].append((doc[:1000], package))
        paths[task] = tuple(directory / f"topics-{task}-{split}.csv" for split in ("train", "validation"))
        for split, path in zip(("train", "validation"), paths[task]):
            random.Random(split).shuffle(rows[split])
            with open(path, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["text", "label"])
                writer.writerows(rows[split])
    return paths


SHAPES = ("circle", "square", "triangle", "cross")


def _draw(draw, shape: str, box: tuple, color: tuple) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=color)
    else:
        w = max(1, (x1 - x0) // 4)
        draw.rectangle(((x0 + x1) // 2 - w, y0, (x0 + x1) // 2 + w, y1), fill=color)
        draw.rectangle((x0, (y0 + y1) // 2 - w, x1, (y0 + y1) // 2 + w), fill=color)


def write_shape_images(directory: Path, quick: bool, size: int) -> dict[str, tuple[Path, Path]]:
    """Two image-folder tasks of synthetic `size`×`size` images: `base` (which shape: circle, square, triangle,
    cross) and `finetune` (how many shapes, 1 to 3, of random kinds), random colours, sizes and places."""
    from PIL import Image, ImageDraw

    per_class = {"train": 16, "validation": 4} if quick else {"train": 500, "validation": 100}
    rng = random.Random(0)
    paths = {}
    for task, labels in (("base", SHAPES), ("finetune", ("1", "2", "3"))):
        paths[task] = tuple(directory / f"shapes-{task}" / split for split in ("train", "validation"))
        for split, root in zip(("train", "validation"), paths[task]):
            for label in labels:
                (root / label).mkdir(parents=True, exist_ok=True)
                for i in range(per_class[split]):
                    image = Image.new("RGB", (size, size), tuple(rng.randint(170, 255) for _ in range(3)))
                    draw = ImageDraw.Draw(image)
                    count = int(label) if task == "finetune" else 1
                    for _ in range(count):
                        extent = rng.randint(size // 5, size // 3 if task == "finetune" else size // 2)
                        x, y = rng.randint(0, size - extent - 1), rng.randint(0, size - extent - 1)
                        shape = label if task == "base" else rng.choice(SHAPES)
                        _draw(draw, shape, (x, y, x + extent, y + extent), tuple(rng.randint(0, 120) for _ in range(3)))
                    image.save(root / label / f"{i}.png")
    return paths


# --- the runs ---------------------------------------------------------------------------------------------------
def plan(work: Path, quick: bool = False, bert_base: Optional[str] = None, vit_base: Optional[str] = None) -> list[Run]:
    """The runs in order (base models before the fine-tunes that start from them). Data paths are under
    `work/data` (written by `prepare_data`)."""
    work = Path(work)
    data, cache = work / "data", ["--cache_dir", str(work / "cache")]
    common = COMMON + cache + (QUICK_TRAINING if quick else [])
    gpt2 = (GPT2_QUICK if quick else GPT2_MODEL + GPT2_TRAINING) + ["--use_stdlib_corpus"] + common
    oialr = ["--delay_steps", "0.5", "--update_every", "0.25", "--sigma_cutoff", "0.5"] if quick else \
        []  # the demo's schedule: the library's defaults
    inrank = ["--init_rank", "2", "--buffer_rank", "8", "--rank_warmup_steps", "2", "--check_every", "2",
              "--freeze_step", "6"] if quick else \
        []  # the library's defaults
    runs = [
        Run("gpt2-oialr", "run_clm.py", ["--lowrank_method", "oialr", *oialr, *gpt2,
                                         "--output_dir", str(work / "gpt2-oialr")],
            "The main job: a small GPT-2 pretrained from scratch on the docstrings of the Python standard library "
            "with OIALR and the library's default schedule (dense for the first 75% of the optimizer steps, then a "
            "basis update every 5% cutting singular values below 0.33 of the largest)."),
        Run("gpt2-dense", "run_clm.py", ["--lowrank_method", "none", *gpt2, "--output_dir", str(work / "gpt2-dense")],
            "The dense twin of `gpt2-oialr`: the same model, data, schedule and seed, without low-rank training."),
        Run("gpt2-inrank", "run_clm.py", ["--lowrank_method", "inrank", *inrank, *gpt2,
                                          "--output_dir", str(work / "gpt2-inrank")],
            "The model and data of `gpt2-oialr`, pretrained with InRank and the library's defaults (efficient mode, "
            "τ = 0.995, buffer 10% of full rank, rank checked every 5% of the run, frozen at half of it)."),
    ]

    text = ["--text_column_names", "text", "--label_column_name", "label", "--max_seq_length", "32" if quick else
            "128"] + ([] if quick else ["--per_device_train_batch_size", "16", "--learning_rate", "1e-3"]) + common
    bert_config = ("hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,"
                   "max_position_embeddings=64" if quick else
                   "hidden_size=256,num_hidden_layers=4,num_attention_heads=4,intermediate_size=1024,"
                   "max_position_embeddings=128")
    epochs = [] if quick else ["--num_train_epochs", "4"]
    if bert_base is None:
        bert_base = str(work / "bert-base")
        runs.append(Run("bert-base", "run_classification.py", [
            "--model_type", "bert", "--config_overrides", bert_config, "--train_tokenizer_vocab_size",
            "512" if quick else "4096", "--train_file", str(data / "topics-base-train.csv"),
            "--validation_file", str(data / "topics-base-validation.csv"), "--lowrank_method", "none", *epochs, *text,
            "--output_dir", bert_base], card=False))
    runs.append(Run("bert-svd-finetune", "run_classification.py", [
        "--model_name_or_path", bert_base, "--ignore_mismatched_sizes", "--train_file",
        str(data / "topics-finetune-train.csv"), "--validation_file", str(data / "topics-finetune-validation.csv"),
        "--lowrank_method", "svd", "--rank_fraction", "0.25", *epochs, *text,
        "--output_dir", str(work / "bert-svd-finetune")],
        "A BERT fine-tune compressed by one-shot SVD: every linear layer truncated to a quarter of its rank before "
        "fine-tuning (the approximation error of each is listed below), then its factors trained on the target task: "
        "the package a Python standard-library docstring comes from (7 packages). The base model is a small BERT "
        "trained here on the same task over 7 other packages.", needs=["bert-base"]))

    image_size = 16 if quick else 32
    image = ([] if quick else ["--per_device_train_batch_size", "32", "--learning_rate", "1e-3"]) + common
    vit_config = (f"image_size={image_size},patch_size=4,hidden_size=32,num_hidden_layers=2,num_attention_heads=2,"
                  "intermediate_size=64" if quick else
                  f"image_size={image_size},patch_size=4,hidden_size=192,num_hidden_layers=4,num_attention_heads=4,"
                  "intermediate_size=768")
    vit_epochs = [] if quick else ["--num_train_epochs", "6"]
    if vit_base is None:
        vit_base = str(work / "vit-base")
        runs.append(Run("vit-base", "run_image_classification.py", [
            "--model_type", "vit", "--config_overrides", vit_config, "--train_dir", str(data / "shapes-base/train"),
            "--validation_dir", str(data / "shapes-base/validation"), "--lowrank_method", "none", *vit_epochs, *image,
            "--output_dir", vit_base], card=False))
    vit_oialr = ["--delay_steps", "0.5", "--update_every", "0.25", "--sigma_cutoff", "0.5"] if quick else \
        ["--delay_steps", "0.3", "--update_every", "0.1", "--sigma_cutoff", "0.2"]
    runs.append(Run("vit-oialr-finetune", "run_image_classification.py", [
        "--model_name_or_path", vit_base, "--ignore_mismatched_sizes", "--train_dir",
        str(data / "shapes-finetune/train"), "--validation_dir", str(data / "shapes-finetune/validation"),
        "--lowrank_method", "oialr", *vit_oialr, *vit_epochs, *image, "--output_dir", str(work / "vit-oialr-finetune")],
        "A ViT fine-tune with OIALR: dense for the first 30% of the optimizer steps, then `U Σ Vᵀ` with frozen bases, "
        "a basis update every 10%. Target task: how many shapes (1–3) a synthetic image holds. The base model is a "
        "small ViT trained here to tell the shapes apart (circle, square, triangle, cross).", needs=["vit-base"]))
    return runs


def prepare_data(work: Path, quick: bool) -> None:
    directory = Path(work) / "data"
    directory.mkdir(parents=True, exist_ok=True)
    write_topic_data(directory, quick)
    write_shape_images(directory, quick, size=16 if quick else 32)


def execute(run: Run, work: Path) -> float:
    """Run one training command (offline, output logged to `work/logs/<name>.log`); returns its seconds."""
    logs = Path(work) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"\n[{run.name}] {run.command()}", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with open(logs / f"{run.name}.log", "w") as log:
        result = subprocess.run([sys.executable, str(SCRIPTS / run.script), *run.args], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        tail = (logs / f"{run.name}.log").read_text().splitlines()[-25:]
        raise SystemExit(f"error: run {run.name} failed (exit {result.returncode}); log: {logs / f'{run.name}.log'}\n"
                         + "\n".join(tail))
    print(f"[{run.name}] done in {seconds / 60:.1f} min", flush=True)
    return seconds


# --- cards -----------------------------------------------------------------------------------------------------
def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _int(text: str) -> int:
    return int(text.split(" ")[0].replace(",", ""))


def card_figures(content: str) -> dict:
    """The figures a card states, parsed back from its Markdown: per-layer rank table and totals, approximation
    errors, layers kept dense, and the whole-model parameter count."""
    figures = {"layers": {}, "totals": None, "errors": {}, "dense_layers": [], "model_params": None}
    section = None
    for line in content.splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
            continue
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        cells = _cells(line)
        if section == "Size" and cells[0] == "parameters (whole model)":
            figures["model_params"] = _int(cells[2])
        elif section == "Rank of each layer" and len(cells) == 7 and cells[0].startswith("`"):
            figures["layers"][cells[0].strip("`")] = {"rank": _int(cells[2]), "max_rank": _int(cells[3]),
                                                      "params": _int(cells[4]), "dense_params": _int(cells[5])}
        elif section == "Rank of each layer" and cells[0] == "**total**":
            figures["totals"] = {"params": _int(cells[4]), "dense_params": _int(cells[5])}
        elif section == "Approximation error" and cells[0].startswith("`"):
            figures["errors"][cells[0].strip("`")] = cells[1]
        elif section == "Layers kept dense" and cells[0].startswith("`"):
            figures["dense_layers"].append(cells[0].strip("`"))
    return figures


def check_card(content: str, summary: dict) -> list[str]:
    """Differences between a card's figures and a `lowrank_summary(...).to_dict()`; empty when they agree."""
    from hf_lowrank.summary import format_error

    figures, problems = card_figures(content), []
    layers = {n: {k: l[k] for k in ("rank", "max_rank", "params", "dense_params")}
              for n, l in summary["layers"].items()}
    if figures["layers"] != layers:
        problems.append(f"layer table {figures['layers']} != summary {layers}")
    if layers and figures["totals"] != {"params": summary["params"], "dense_params": summary["dense_params"]}:
        problems.append(f"totals {figures['totals']} != {summary['params']}, {summary['dense_params']}")
    errors = {n: format_error(l["approximation_error"]) for n, l in summary["layers"].items()
              if l.get("approximation_error") is not None}
    if figures["errors"] != errors:
        problems.append(f"approximation errors {figures['errors']} != {errors}")
    if sorted(figures["dense_layers"]) != sorted(summary["dense_layers"]):
        problems.append(f"layers kept dense {figures['dense_layers']} != {sorted(summary['dense_layers'])}")
    if figures["model_params"] != summary["model_params"]:
        problems.append(f"model parameters {figures['model_params']} != {summary['model_params']}")
    return problems


def write_card(run: Run, dest: Path, work: Path) -> dict:
    """Rewrite the run's card from its saved model directory, check it against the model's summary, and copy it
    with its plots and `lowrank_summary.json` into `dest/<name>/`. Returns the summary as a dict."""
    from hf_lowrank import lowrank_summary
    from hf_lowrank.hub import save_model_card
    from hf_lowrank.hub.loading import load_pretrained_dir

    out = run.output_dir
    model = load_pretrained_dir(str(out))
    summary = lowrank_summary(model).to_dict()
    description = (f"{run.description}\n\nA reference run of `hf_lowrank`, regenerated by `{COMMAND}` (`$WORK` is "
                   f"its `--work_dir`) with:\n\n```bash\n{run.command(work)}\n```")
    path = save_model_card(str(out), model_name=run.name, description=description, overwrite=True)
    content = Path(path).read_text()
    problems = check_card(content, summary)
    if problems:
        raise SystemExit(f"error: the card of {run.name} disagrees with its model: " + "; ".join(problems))
    target = Path(dest) / run.name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    shutil.copy2(path, target / "README.md")
    for name in IMAGE_LINK.findall(content) + ["lowrank_history.json", "all_results.json"]:
        if (out / name).is_file():
            shutil.copy2(out / name, target / name)
    (target / SUMMARY_NAME).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def write_index(runs: list[Run], dest: Path, quick: bool) -> None:
    """`dest/README.md`: one row per card with its compression and evaluation results."""
    rows = []
    for run in runs:
        folder = Path(dest) / run.name
        if not (folder / SUMMARY_NAME).is_file():
            continue
        summary = json.loads((folder / SUMMARY_NAME).read_text())
        results_path = folder / "all_results.json"
        results = json.loads(results_path.read_text()) if results_path.is_file() else {}
        metric = (f"perplexity {results['perplexity']:.2f}" if "perplexity" in results else
                  f"accuracy {results['eval_accuracy']:.3f}" if "eval_accuracy" in results else "–")
        layers = (f"{summary['compression']:.1%} of {summary['dense_params']:,}" if summary["layers"] else "dense")
        rows.append(f"| [{run.name}]({run.name}/README.md) | `{run.script}` | {layers} | "
                    f"{summary['rank_fraction']:.1%} | {metric} |")
    text = ["# Reference model cards", "",
            "Cards of the reference runs, written by `hf_lowrank.hub.save_model_card` from the saved models of real "
            f"runs of `training_scripts/` and regenerated by `{COMMAND}`" + (" (here: `--quick`, tiny models, a "
            "check only)" if quick else "") + ". Each folder holds the card (`README.md`), its plots, the run's "
            f"rank history and results, and `{SUMMARY_NAME}` (`lowrank_summary` of the saved model, which "
            "`tests/test_ecosystem.py` checks every figure of the card against). The exact command of each run "
            "is in its card.", "",
            "| card | script | factorized layers: parameters | rank fraction | evaluation |",
            "|---|---|---:|---:|---|", *rows, ""]
    (Path(dest) / "README.md").write_text("\n".join(text))


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and a few steps: checks the pipeline")
    parser.add_argument("--work_dir", default=None, help="where runs, data and logs go (default: a fresh folder "
                        "under the system's temporary directory)")
    parser.add_argument("--dest", default=None, help="where the cards are copied (default: model_cards/, or "
                        "WORK/model_cards with --quick)")
    parser.add_argument("--only", nargs="+", choices=CARDS, help="regenerate these cards only")
    parser.add_argument("--bert_base", default=None, help="fine-tune this BERT checkpoint (directory or Hub id) "
                        "instead of training a base model here")
    parser.add_argument("--vit_base", default=None, help="fine-tune this ViT checkpoint instead of training one here")
    parser.add_argument("--cards_only", action="store_true", help="skip training: rewrite the cards of the runs "
                        "already in --work_dir")
    args = parser.parse_args(argv)
    import tempfile

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="hf_lowrank_cards_")).resolve()
    dest = Path(args.dest or (work / "model_cards" if args.quick else HERE)).resolve()
    runs = plan(work, args.quick, args.bert_base, args.vit_base)
    if args.only:
        wanted = set(args.only) | {need for run in runs if run.name in args.only for need in run.needs}
        runs = [run for run in runs if run.name in wanted]
    print(f"[regenerate] work dir {work}; cards to {dest}", flush=True)
    total = time.perf_counter()
    if not args.cards_only:
        prepare_data(work, args.quick)
        for run in runs:
            execute(run, work)
    dest.mkdir(parents=True, exist_ok=True)
    for run in runs:
        if run.card:
            summary = write_card(run, dest, work)
            print(f"[{run.name}] card: {dest / run.name / 'README.md'} ({len(summary['layers'])} factorized layers, "
                  f"{summary['compression']:.1%} of their dense parameters)", flush=True)
    write_index([run for run in plan(work, args.quick, args.bert_base, args.vit_base) if run.card], dest, args.quick)
    print(f"[regenerate] {len([r for r in runs if r.card])} cards in {dest} "
          f"({(time.perf_counter() - total) / 60:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
