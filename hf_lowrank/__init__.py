"""hf_lowrank: adaptive low-rank training (OIALR, InRank, SVD) as an ordinary Hugging Face workflow.

Importing the package registers the `hf_lowrank` quantization method with transformers, so
`AutoModelFor*.from_pretrained(dir)` returns saved factorized models factorized.
"""

__version__ = "0.1.0"

from .config import LowRankConfig
from .controller import LowRankController
from .diagnostics import CumulativeRankCallback, LowRankDiagnosticsCallback
from .hub import push_to_hub
from .inject import get_lowrank_model
from .layers import LowRankLinear
from .serialization import LowRankHfQuantizer, LowRankQuantizationConfig, merge_and_unload
from .summary import lowrank_summary
from .trainer import LowRankTrainer

__all__ = [
    "CumulativeRankCallback",
    "LowRankConfig",
    "LowRankController",
    "LowRankDiagnosticsCallback",
    "LowRankTrainer",
    "LowRankLinear",
    "LowRankQuantizationConfig",
    "LowRankHfQuantizer",
    "get_lowrank_model",
    "lowrank_summary",
    "merge_and_unload",
    "push_to_hub",
]
