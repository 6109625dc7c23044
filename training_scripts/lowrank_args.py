"""The low-rank arguments shared by the training scripts, generated from `hf_lowrank.LowRankConfig`.

`LowRankArguments` has one command-line argument per `LowRankConfig` field, under the field's own name
(`--delay_steps`, `--update_every`, `--sigma_cutoff`, `--init_rank`, ...), with the field's default and help
text; the method field is `--lowrank_method` (`oialr`, `inrank`, `svd`, or `none` for plain dense training).
Because the dataclass is built from `LowRankConfig` at import time, a field added to the library appears here
without an edit, and a field whose name clashes with a `TrainingArguments` field fails at import.

Command-line forms of the non-scalar fields:

- schedule knobs (`--delay_steps`, `--update_every`, `--rank_warmup_steps`, `--check_every`, `--freeze_step`):
  a whole number of optimizer steps (`500`) or a fraction of the run's optimizer steps (`0.3`);
  `--freeze_step none` never freezes.
- `--target_modules`: `all-linear`; or comma-separated module-name suffixes (`c_attn,c_fc`); or a regular
  expression matched against the full module name (any value with one of ``*+?[](){}|^$\\``).
  `--exclude_modules` takes the same forms.
- `--rank_pattern`: JSON, e.g. `'{"c_attn": 0.25, "mlp.c_proj": 64}'`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Optional, Union

from transformers import TrainingArguments

from hf_lowrank import LowRankConfig
from hf_lowrank.config import knob_owner
from hf_lowrank.methods import method_class, method_names

METHOD_ARG = "lowrank_method"
# The registered methods (third-party ones included, when registered before this module is imported), or none.
METHOD_CHOICES = (*method_names(), "none")
_REGEX_CHARS = set("*+?[](){}|^$\\")


# --- argparse type functions (their names show in argparse's error messages) ------------------------------
def steps(value: str) -> Union[int, float]:
    """`500` → 500 optimizer steps; `0.3` → 30% of the run."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a step count (e.g. 500) or a fraction of the run "
                                         "(e.g. 0.3)") from None
    if number.is_integer() and number >= 0:
        return int(number)
    if not 0.0 < number < 1.0:
        raise argparse.ArgumentTypeError(f"{value!r}: use a whole number of optimizer steps, or a fraction of "
                                         "the run in (0, 1)")
    return number


def optional_steps(value: str) -> Optional[Union[int, float]]:
    """Like `steps`; `none` gives None."""
    return None if value.strip().lower() in ("none", "null", "") else steps(value)


def module_spec(value: str) -> Optional[Union[str, list[str]]]:
    """`all-linear` / a regex (kept as a string) / comma-separated suffixes (a list); `none` gives None."""
    value = value.strip()
    if value.lower() in ("none", "null", ""):
        return None
    if value == "all-linear" or _REGEX_CHARS & set(value):
        return value
    return [part.strip() for part in value.split(",") if part.strip()]


def json_dict(value: str) -> dict:
    """A JSON object, e.g. '{"c_attn": 0.25}'."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error.msg}): {value!r}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"c_attn\": 0.25}}', got {value!r}")
    return parsed


def _argument_type(hint):
    """The command-line type for a LowRankConfig annotation."""
    if hint in (bool, int, float, str):
        return hint
    args = set(typing.get_args(hint))
    optional = type(None) in args
    args.discard(type(None))
    if args == {int, float}:
        return optional_steps if optional else steps
    if args == {float} and optional:
        return Optional[float]
    if args == {int} and optional:
        return Optional[int]
    if args == {str} and optional:
        return Optional[str]
    if str in args and any(typing.get_origin(a) is list for a in args):
        return module_spec
    if hint is dict or typing.get_origin(hint) is dict:
        return json_dict
    raise TypeError(f"LowRankConfig field type {hint!r} has no command-line form yet: extend "
                    "training_scripts/lowrank_args.py::_argument_type.")


_FORM_HELP = {
    steps: " Command line: a step count (500) or a fraction of the run's optimizer steps (0.3).",
    optional_steps: " Command line: a step count (500), a fraction of the run (0.3), or none.",
    module_spec: " Command line: all-linear, comma-separated suffixes (c_attn,c_fc), a regex, or none.",
    json_dict: """ Command line: JSON, e.g. '{"c_attn": 0.25}'.""",
}


def _build_lowrank_arguments():
    hints = typing.get_type_hints(LowRankConfig)
    training_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    specs = []
    for f in dataclasses.fields(LowRankConfig):
        if not f.init:
            continue
        name = METHOD_ARG if f.name == "method" else f.name
        if name in training_fields:
            raise TypeError(f"LowRankConfig field {f.name!r} clashes with TrainingArguments.{name}: rename it.")
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help ("5% of the run")
        if f.name == "method":
            metadata = {"help": help_text.rstrip(".") + ", or 'none' (plain dense training with Trainer).",
                        "choices": list(METHOD_CHOICES)}
            specs.append((name, str, dataclasses.field(default=f.default, metadata=metadata)))
            continue
        arg_type = _argument_type(hints[f.name])
        owner = f.metadata.get("method")
        prefix = f"{method_class(owner).title}: " if owner else ""  # which method the knob belongs to
        # a count-or-fraction of ranks (metadata unit "rank") is not a schedule: no "of the run" hint
        form = "" if f.metadata.get("unit") == "rank" else _FORM_HELP.get(arg_type, "")
        metadata = {"help": prefix + help_text + form}
        if f.default_factory is not dataclasses.MISSING:
            spec = dataclasses.field(default_factory=f.default_factory, metadata=metadata)
        else:
            spec = dataclasses.field(default=f.default, metadata=metadata)
        specs.append((name, arg_type, spec))
    cls = dataclasses.make_dataclass("LowRankArguments", specs, namespace={
        "__doc__": "Low-rank training arguments: one per `hf_lowrank.LowRankConfig` field (`method` is "
                   "`--lowrank_method`).",
        "_argument_group_name": "low-rank training (hf_lowrank.LowRankConfig)",
    })
    cls.__module__ = __name__
    return cls


LowRankArguments = _build_lowrank_arguments()
LOWRANK_ARGUMENT_NAMES = tuple(f.name for f in dataclasses.fields(LowRankArguments))


def lowrank_config_from_args(args) -> Optional[LowRankConfig]:
    """The `LowRankConfig` the arguments describe, or None for `--lowrank_method none`.

    Raises `ValueError` (message naming the argument) on invalid values.
    """
    method = getattr(args, METHOD_ARG)
    if method == "none":
        return None
    kwargs = {}
    for f in dataclasses.fields(LowRankConfig):
        if f.init:
            kwargs[f.name] = method if f.name == "method" else getattr(args, f.name)
    return LowRankConfig(**kwargs)


def ignored_knobs(args) -> list[str]:
    """Knobs set away from their default that belong to another method than the chosen one."""
    method = getattr(args, METHOD_ARG)
    if method == "none":  # dense training: nothing low-rank applies, said once in the run's summary
        return []
    defaults = LowRankConfig()
    ignored = []
    for f in dataclasses.fields(LowRankConfig):
        owner = knob_owner(f.name)
        if owner is None or owner == method:
            continue
        if getattr(args, f.name) != getattr(defaults, f.name):
            ignored.append(f"--{f.name}")
    return ignored
