"""`hf-lowrank` console command: inspect, merge, card and push saved low-rank models.

    hf-lowrank inspect DIR          per-layer rank table and compression
    hf-lowrank export DIR OUT       smallest form for use (Σ folded, layers not worth factorizing merged)
    hf-lowrank merge DIR OUT        dense export that loads without hf_lowrank
    hf-lowrank card DIR             write or refresh DIR/README.md (model card + plots)
    hf-lowrank push DIR REPO_ID     upload weights, config, tokenizer/processor and card in one commit
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Optional


class CommandError(Exception):
    """An error to report as one clear line, without a traceback."""


def _load(directory: str):
    from .hub.loading import NotAModelError, load_pretrained_dir

    try:
        return load_pretrained_dir(directory)
    except NotAModelError as err:
        raise CommandError(str(err)) from None
    except (OSError, ValueError) as err:  # e.g. inconsistent ranks, unreadable weights
        raise CommandError(f"cannot load the model in {directory!r}: {err}") from None


# --- subcommands -------------------------------------------------------------------------------------

def cmd_inspect(args) -> int:
    from .summary import lowrank_summary

    model = _load(args.dir)
    summary = lowrank_summary(model)
    if args.json:
        print(json.dumps({"architecture": type(model).__name__, **summary.to_dict()}, indent=2))
        return 0
    name = type(model).__name__
    if not summary.layers:
        print(f"{args.dir}: {name} with no factorized layers (a dense model, {summary.model_params:,} parameters); "
              "nothing to inspect.")
        return 0
    config = getattr(model, "lowrank_config", None)
    method = f", method {config.method}" if config is not None else ""
    print(f"{args.dir}: {name}{method}, {len(summary.layers)} factorized layers")
    print(summary)
    print(f"factorized layers store {summary.compression:.1%} of their dense parameters "
          f"({summary.params:,} of {summary.dense_params:,}) at {summary.rank_fraction:.1%} of full rank")
    return 0


def _check_output(args, what: str) -> str:
    """OUT must not be DIR (paths resolved, so also not through a symlink) and, unless --overwrite, must be empty
    or absent. Returns the resolved OUT; nothing is changed yet (DIR may still fail to load)."""
    source, target = os.path.realpath(args.dir), os.path.realpath(args.out)
    if source == target:
        raise CommandError(f"OUT must differ from DIR ({args.out!r} is {args.dir!r}): {what} in place would overwrite "
                           "the factorized model. Choose another OUT.")
    if os.path.isdir(target) and os.listdir(target) and not args.overwrite:
        raise CommandError(f"{args.out!r} exists and is not empty; choose another OUT or pass --overwrite.")
    return target


def _save_over(model, target: str) -> None:
    """`model.save_pretrained(target)` after removing the weights of an earlier model there: a sharded one's
    shards and index would otherwise stay beside ours and mix with them. Symlinks are removed as links (never
    written through)."""
    if os.path.isdir(target):
        for name in os.listdir(target):
            if name.startswith(("model.safetensors", "model-", "pytorch_model")):
                os.remove(os.path.join(target, name))
    model.save_pretrained(target)


def cmd_export(args) -> int:
    from .history import HISTORY_NAME
    from .hub.loading import copy_processor_files, is_regular_file
    from .serialization import to_use_form
    from .summary import lowrank_summary

    target = _check_output(args, "exporting")
    model = _load(args.dir)
    before = lowrank_summary(model)
    to_use_form(model)
    after = lowrank_summary(model)
    _save_over(model, target)
    copied = copy_processor_files(args.dir, target)
    if is_regular_file(os.path.join(args.dir, HISTORY_NAME)):
        shutil.copyfile(os.path.join(args.dir, HISTORY_NAME), os.path.join(target, HISTORY_NAME))
    merged = len(before.layers) - len(after.layers)
    print(f"Wrote the use form of {type(model).__name__} to {args.out}: {len(after.layers)} factorized layers store "
          f"{after.params:,} parameters (training form: {before.params:,}; dense: {before.dense_params:,})"
          + (f", {merged} merged to dense" if merged else "") + (f"; copied {', '.join(copied)}" if copied else "")
          + ".")
    return 0


def cmd_merge(args) -> int:
    from .hub.loading import copy_processor_files
    from .layers import LowRankLinear
    from .serialization import merge_and_unload

    target = _check_output(args, "merging")
    model = _load(args.dir)
    factorized = sum(isinstance(m, LowRankLinear) for m in model.modules())
    merge_and_unload(model)
    _save_over(model, target)
    copied = copy_processor_files(args.dir, target)
    what = f"{factorized} factorized layers merged" if factorized else "the model had no factorized layers"
    extra = f"; copied {', '.join(copied)}" if copied else ""
    print(f"Wrote a dense {type(model).__name__} to {args.out} ({what}; loads without hf_lowrank{extra}).")
    return 0


def _card_kwargs(args) -> dict:
    results = None
    if args.eval_results:
        try:
            with open(args.eval_results) as f:
                results = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise CommandError(f"cannot read --eval_results {args.eval_results!r}: {err}") from None
    kwargs = {"base_model": args.base_model, "datasets": args.dataset, "dataset_config": args.dataset_config,
              "dataset_split": args.dataset_split, "license": args.license, "language": args.language,
              "model_name": args.model_name, "tags": args.tags, "eval_results": results}
    return {k: v for k, v in kwargs.items() if v is not None}


def cmd_card(args) -> int:
    from .hub.card import save_model_card
    from .hub.loading import NotAModelError

    try:
        path = save_model_card(args.dir, overwrite=args.overwrite, repo_id=args.repo_id, **_card_kwargs(args))
    except NotAModelError as err:
        raise CommandError(str(err)) from None
    except FileExistsError as err:
        raise CommandError(str(err)) from None
    print(f"Wrote {path}")
    return 0


def cmd_push(args) -> int:
    from huggingface_hub.errors import OfflineModeIsEnabled

    from .hub.loading import NotAModelError
    from .hub.push import push_to_hub

    try:
        info = push_to_hub(args.dir, args.repo_id, token=args.token, private=args.private or None,
                           commit_message=args.commit_message, revision=args.revision, **_card_kwargs(args))
    except (NotAModelError, OfflineModeIsEnabled) as err:
        raise CommandError(str(err)) from None
    except ValueError as err:  # e.g. inconsistent ranks, truncated weights, an invalid repository id
        raise CommandError(f"cannot push {args.dir!r}: {err}") from None
    url = getattr(info, "commit_url", None) or args.repo_id
    print(f"Pushed {args.dir} to {args.repo_id} ({url})")
    return 0


# --- parser ------------------------------------------------------------------------------------------

def _add_card_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model card")
    group.add_argument("--base_model", help="Hub id of the model this one was trained from.")
    group.add_argument("--dataset", action="append", help="Hub id of a training/evaluation dataset (repeatable; "
                       "the first is the evaluated one).")
    group.add_argument("--dataset_config", help="Configuration of the evaluated dataset, e.g. wikitext-103-raw-v1.")
    group.add_argument("--dataset_split", help="Split the evaluation results were computed on.")
    group.add_argument("--eval_results", help="JSON file of metrics, e.g. {\"eval_loss\": 3.2}; by default "
                       "DIR/all_results.json and DIR/eval_results.json are read.")
    group.add_argument("--model_name", help="Title of the card (default: the repository or directory name).")
    group.add_argument("--license", help="License id, e.g. apache-2.0.")
    group.add_argument("--language", action="append", help="Language code (repeatable).")
    group.add_argument("--tags", action="append", help="Extra Hub tag (repeatable).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-lowrank", description="Inspect, merge, document and push models saved by hf_lowrank.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("inspect", help="per-layer rank table and compression of a saved model",
                       description="Print the per-layer rank table and compression of a model saved with "
                                   "save_pretrained (factorized by hf_lowrank, or dense).")
    p.add_argument("dir", metavar="DIR", help="directory written by save_pretrained")
    p.add_argument("--json", action="store_true", help="print lowrank_summary(model).to_dict() as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export", help="smallest form for use (Σ folded into the bases)",
                       description="Save DIR in its smallest form for use to OUT: OIALR's Σ folded into the bases "
                                   "(r·(in+out) plus bias per layer), every layer whose factors would not be smaller "
                                   "than dense merged. Loads like DIR (after import hf_lowrank).")
    p.add_argument("dir", metavar="DIR", help="directory of the factorized model")
    p.add_argument("out", metavar="OUT", help="directory to write the exported model to")
    p.add_argument("--overwrite", action="store_true", help="write into OUT even if it is not empty")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("merge", help="dense export that loads without hf_lowrank",
                       description="Merge every factorized layer back to dense and save the model to OUT, "
                                   "without quantization_config, with DIR's tokenizer/processor files.")
    p.add_argument("dir", metavar="DIR", help="directory of the factorized model")
    p.add_argument("out", metavar="OUT", help="directory to write the dense model to")
    p.add_argument("--overwrite", action="store_true", help="write into OUT even if it is not empty")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("card", help="write or refresh DIR/README.md",
                       description="Write the model card (DIR/README.md) and its plots into DIR. A README "
                                   "generated by hf_lowrank or the Trainer is refreshed; a hand-written one "
                                   "is kept unless --overwrite.")
    p.add_argument("dir", metavar="DIR", help="directory of the saved model")
    p.add_argument("--repo_id", help="Hub repository the card will live in (used in the loading snippet)")
    p.add_argument("--overwrite", action="store_true", help="replace a hand-written README.md")
    _add_card_options(p)
    p.set_defaults(func=cmd_card)

    p = sub.add_parser("push", help="upload model, tokenizer/processor and card to the Hub",
                       description="Upload DIR's weights, config, tokenizer/processor files, rank history and "
                                   "a freshly generated model card to REPO_ID in one commit (created if needed).")
    p.add_argument("dir", metavar="DIR", help="directory of the saved model")
    p.add_argument("repo_id", metavar="REPO_ID", help="Hub repository, e.g. user/gpt2-lowrank")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the one saved by `hf auth login`)")
    p.add_argument("--commit_message", help="commit message")
    p.add_argument("--revision", help="branch to push to")
    _add_card_options(p)
    p.set_defaults(func=cmd_push)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the `hf-lowrank` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CommandError as err:
        print(f"hf-lowrank {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
