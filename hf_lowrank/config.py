"""`LowRankConfig`: what to factorize and how its rank is chosen (PEFT-style dataclass)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

from .registry import method_class

CONFIG_NAME = "lowrank_config.json"
INRANK_MODES = ("efficient", "cumulative")


def knob_owner(name: str) -> Optional[str]:
    """The method a `LowRankConfig` field belongs to (declared in its metadata), or None for shared fields."""
    for f in dataclasses.fields(LowRankConfig):
        if f.name == name:
            return f.metadata.get("method")
    raise KeyError(f"LowRankConfig has no field {name!r}.")


def method_fields(method: str) -> list[dataclasses.Field]:
    """The fields that apply to `method`: the shared ones and the ones it owns, in declaration order."""
    return [f for f in dataclasses.fields(LowRankConfig) if f.metadata.get("method") in (None, method)
            and (f.name != "method_options" or method_class(method).options_class is not None)]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_step_count(value) -> bool:
    """A schedule knob is a whole number of optimizer steps, or a fraction in (0, 1) of the run."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 0
    return isinstance(value, float) and 0.0 < value < 1.0


@dataclass
class LowRankConfig:
    """Configuration of adaptive low-rank training.

    Every schedule knob counts **optimizer steps** (not forward calls or micro-batches). A knob given as a
    float in (0, 1) is a fraction of the run's total optimizer steps (the Trainer knows them; a raw loop
    passes its dataloader and epochs, or `num_training_steps`, to `LowRankController`). The defaults are such
    fractions, chosen by the measured sweep in the README, so that a run of any length compresses; whole numbers
    give absolute step counts.
    """

    method: str = field(
        default="oialr",
        metadata={"help": "'oialr' (full-rank warm-up, then U Σ Vᵀ with frozen bases, rank shrinks), "
                  "'inrank' (factorized from the start, rank grows) or 'svd' (one-shot truncation)."},
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default="all-linear",
        metadata={"help": "'all-linear' (every nn.Linear / GPT-2 Conv1D except the output head and "
                  "classifier), a list of module-name suffixes, or a regex matched against the full name."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module-name suffixes or a regex never to factorize."}
    )
    rank_pattern: dict = field(
        default_factory=dict,
        metadata={"help": "Per-layer starting rank: {name suffix or regex: rank}. An int is a rank, a float "
                  "in (0, 1) a fraction of the layer's full rank."},
    )
    method_options: dict = field(
        default_factory=dict,
        metadata={"help": "Options of a third-party method (its `Method.options_class` fields), as a dict; the "
                  "built-in methods take their knobs as the fields below."},
    )
    # svd
    rank_fraction: float = field(
        default=0.5, metadata={"method": "svd", "help": "Kept fraction of each layer's full rank min(in, out)."}
    )
    energy_threshold: Optional[float] = field(
        default=None,
        metadata={"method": "svd", "help": "If set, keep the fewest singular values holding this fraction of the "
                  "squared Frobenius norm (overrides rank_fraction)."},
    )
    # OIALR
    delay_steps: Union[int, float] = field(
        default=0.75, metadata={"method": "oialr", "help": "Full-rank optimizer steps before conversion to U Σ Vᵀ "
                                          "(default: 75% of the run; the paper's code uses 1000 steps)."}
    )
    update_every: Union[int, float] = field(
        default=0.05, metadata={"method": "oialr", "help": "Optimizer steps between basis updates (rotate + cut) "
                                          "(default: 5% of the run)."}
    )
    sigma_cutoff: float = field(
        default=0.33, metadata={"method": "oialr", "help": "Keep singular values ≥ this fraction of the layer's largest "
                                         "(the paper's code: 0.1–0.2)."}
    )
    max_cut_fraction: float = field(
        default=0.5, metadata={"method": "oialr", "help": "At most this fraction of a layer's rank is cut in one update."}
    )
    min_rank: int = field(default=1, metadata={"method": "oialr", "help": "No layer is cut below this rank."})
    min_rank_fraction: float = field(
        default=0.01, metadata={"method": "oialr", "help": "No layer is cut below this fraction of its full rank."}
    )
    rotate_without_cut: bool = field(
        default=False,
        metadata={"method": "oialr", "help": "Also rotate the bases of layers whose rank does not change at an update (the "
                  "reference code always rotates). Off by default: such a rotation leaves W unchanged but moves "
                  "Adam's element-wise second moments into a basis where they no longer fit exactly."},
    )
    progressive_rollout: float = field(
        default=0.0,
        metadata={"method": "oialr", "help": "If > 0, each update cuts only the last k layers (output side first), "
                  "k growing by this fraction of the layers per update (the paper's code uses 0.1)."},
    )
    keep_first_layer: bool = field(default=False, metadata={"method": "oialr", "help": "Leave the first target dense."})
    keep_last_layer: bool = field(default=False, metadata={"method": "oialr", "help": "Leave the last target dense."})
    # InRank
    inrank_mode: str = field(
        default="efficient",
        metadata={"method": "inrank", "help": "'efficient' (the weight is U Vᵀ, trained from scratch) or 'cumulative' "
                  "(W = W0 + U Vᵀ with U Vᵀ = 0 at start, for fine-tuning)."},
    )
    init_rank: int = field(default=2, metadata={"method": "inrank", "help": "Starting rank r."})
    buffer_rank: Union[int, float] = field(
        default=0.1,
        metadata={"method": "inrank", "help": "Extra components b trained beside the rank until freeze_step: a count, or "
                  "a float in (0, 1) as a fraction of each layer's full rank (the paper's 100 is 0.13 of GPT-2 small's "
                  "768).", "unit": "rank"},
    )
    explained_ratio: float = field(
        default=0.995,
        metadata={"method": "inrank", "help": "τ, the fraction of the cumulative update's energy the rank must explain."},
    )
    rank_warmup_steps: Union[int, float] = field(
        default=0.05, metadata={"method": "inrank", "help": "Optimizer steps before the first rank check (default: 5% "
                                          "of the run)."}
    )
    check_every: Union[int, float] = field(
        default=0.05, metadata={"method": "inrank", "help": "Optimizer steps between rank checks (default: 5% of the "
                                          "run)."}
    )
    freeze_step: Optional[Union[int, float]] = field(
        default=0.5,
        metadata={"method": "inrank", "help": "At this step the rank is fixed and the buffer dropped (default: half-way "
                  "through the run; None: never)."},
    )
    max_rank_fraction: float = field(
        default=0.4, metadata={"method": "inrank", "help": "Rank + buffer never exceeds this fraction of full rank."}
    )

    def __post_init__(self):
        method_cls = method_class(self.method)  # ValueError naming the registered methods
        _check(isinstance(self.method_options, dict), f"method_options={self.method_options!r} must be a dict.")
        method_cls.check_options(self.method_options)
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        _check(self.target_modules not in (None, "", []), "target_modules is empty: use 'all-linear' or names.")
        _check(isinstance(self.rank_pattern, dict), f"rank_pattern={self.rank_pattern!r} must be a dict "
               "{layer name suffix or regex: rank or fraction}, e.g. {'c_attn': 0.25}.")
        for key, value in self.rank_pattern.items():
            ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 1) or (
                isinstance(value, float) and 0.0 < value <= 1.0
            )
            _check(ok, f"rank_pattern[{key!r}] = {value!r}: use a rank ≥ 1 or a fraction in (0, 1].")
        _check(0.0 < self.rank_fraction <= 1.0, f"rank_fraction={self.rank_fraction} must be in (0, 1].")
        if self.energy_threshold is not None:
            _check(0.0 < self.energy_threshold <= 1.0, f"energy_threshold={self.energy_threshold} must be in (0, 1].")
        for name in ("delay_steps", "update_every", "rank_warmup_steps", "check_every"):
            value = getattr(self, name)
            _check(_is_step_count(value), f"{name}={value!r}: use a step count ≥ 0 or a fraction in (0, 1).")
        _check(self.update_every != 0, "update_every must be at least 1 optimizer step.")
        _check(self.check_every != 0, "check_every must be at least 1 optimizer step.")
        _check(0.0 <= self.sigma_cutoff < 1.0, f"sigma_cutoff={self.sigma_cutoff} must be in [0, 1).")
        _check(0.0 < self.max_cut_fraction <= 1.0, f"max_cut_fraction={self.max_cut_fraction} must be in (0, 1].")
        _check(self.min_rank >= 1, f"min_rank={self.min_rank} must be ≥ 1.")
        _check(0.0 <= self.min_rank_fraction <= 1.0, f"min_rank_fraction={self.min_rank_fraction} must be in [0, 1].")
        _check(0.0 <= self.progressive_rollout <= 1.0, f"progressive_rollout={self.progressive_rollout} must be in [0, 1].")
        _check(self.inrank_mode in INRANK_MODES,
               f"Unknown inrank_mode {self.inrank_mode!r}: choose one of {', '.join(INRANK_MODES)}.")
        _check(self.init_rank >= 1, f"init_rank={self.init_rank} must be ≥ 1.")
        _check(not isinstance(self.buffer_rank, bool) and (
            (isinstance(self.buffer_rank, int) and self.buffer_rank >= 0)
            or (isinstance(self.buffer_rank, float) and 0.0 < self.buffer_rank < 1.0)),
            f"buffer_rank={self.buffer_rank!r}: use a count ≥ 0 or a fraction of full rank in (0, 1).")
        _check(0.0 < self.explained_ratio <= 1.0, f"explained_ratio (τ)={self.explained_ratio} must be in (0, 1].")
        _check(0.0 < self.max_rank_fraction <= 1.0, f"max_rank_fraction={self.max_rank_fraction} must be in (0, 1].")
        if self.freeze_step is not None:
            _check(_is_step_count(self.freeze_step), f"freeze_step={self.freeze_step!r}: use a step count or a fraction.")
            if type(self.freeze_step) is type(self.rank_warmup_steps):
                _check(self.freeze_step >= self.rank_warmup_steps,
                       f"freeze_step={self.freeze_step} comes before rank_warmup_steps={self.rank_warmup_steps}: "
                       "the rank would be frozen before it is ever checked.")

    # --- serialization -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-serializable dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LowRankConfig":
        """Build from a dict; keys this version does not know are dropped with a warning."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"LowRankConfig: ignoring unknown keys {unknown} (saved by another version?).")
        return cls(**{k: v for k, v in data.items() if k in known})

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> str:
        """Write `lowrank_config.json` into `save_directory`; returns the file path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
        return path

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], **kwargs) -> "LowRankConfig":
        """Read from a directory (or a JSON file, or a Hub repo id) holding `lowrank_config.json`.

        A saved model directory whose `config.json` carries the `hf_lowrank` quantization config also works.
        """
        path = str(path)
        candidates = [path] if path.endswith(".json") else [os.path.join(path, CONFIG_NAME)]
        for candidate in candidates:
            if os.path.isfile(candidate):
                with open(candidate) as f:
                    return cls.from_dict(json.load(f))
        model_config = os.path.join(path, "config.json")
        if os.path.isfile(model_config):
            with open(model_config) as f:
                quant = json.load(f).get("quantization_config") or {}
            if quant.get("quant_method") == "hf_lowrank":
                return cls.from_dict(quant.get("lowrank_config", {}))
        if not os.path.exists(path) and re.fullmatch(r"[\w.-]+/[\w.-]+", path):
            from huggingface_hub import hf_hub_download

            with open(hf_hub_download(path, CONFIG_NAME, **kwargs)) as f:
                return cls.from_dict(json.load(f))
        raise FileNotFoundError(f"No {CONFIG_NAME} in {path!r} (and no hf_lowrank quantization_config in its config.json).")
