"""Rank methods: each decides what to change; `surgery` applies it."""

from ..config import LowRankConfig
from .base import LayerChange, Method, resolve_steps
from .oialr import OIALRMethod
from .svd import SVDMethod

METHOD_CLASSES = {"svd": SVDMethod, "oialr": OIALRMethod}


def get_method(config: LowRankConfig) -> Method:
    """The method object for `config.method`."""
    if config.method == "inrank":
        from .inrank import InRankMethod

        return InRankMethod(config)
    return METHOD_CLASSES[config.method](config)


__all__ = ["LayerChange", "Method", "resolve_steps", "get_method", "OIALRMethod", "SVDMethod"]
