"""hf_lowrank: adaptive low-rank training (OIALR, InRank, SVD) as an ordinary Hugging Face workflow.

Importing the package registers the `hf_lowrank` quantization method with transformers, so
`AutoModelFor*.from_pretrained(dir)` returns saved factorized models factorized. The Trainer, the raw-loop
controller, Hub code and diagnostics load on first use, so the import every load needs stays quick.
"""

import importlib

from .config import LowRankConfig
from .inject import get_lowrank_model
from .layers import LowRankLinear
from .methods import register_method
from .serialization import (LowRankHfQuantizer, LowRankQuantizationConfig, merge_and_unload, save_for_use,
                            to_use_form)
from .summary import lowrank_summary
from .version import __version__

# name -> module that defines it, imported on first access (PEP 562)
_LAZY = {
    "LowRankController": ".controller",
    "LowRankTrainer": ".trainer",
    "push_to_hub": ".hub",
    "CumulativeRankCallback": ".diagnostics",
    "LowRankDiagnosticsCallback": ".diagnostics",
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CumulativeRankCallback",
    "LowRankConfig",
    "LowRankController",
    "LowRankDiagnosticsCallback",
    "LowRankTrainer",
    "LowRankLinear",
    "LowRankQuantizationConfig",
    "LowRankHfQuantizer",
    "__version__",
    "get_lowrank_model",
    "lowrank_summary",
    "merge_and_unload",
    "push_to_hub",
    "register_method",
    "save_for_use",
    "to_use_form",
]
