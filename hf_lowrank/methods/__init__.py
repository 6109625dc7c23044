"""Rank methods: each decides what to change; `surgery` applies it."""

from ..config import LowRankConfig
from .base import LayerChange, Method, resolve_steps
from .inrank import InRankMethod
from .oialr import OIALRMethod
from .svd import SVDMethod

METHOD_CLASSES = {"svd": SVDMethod, "oialr": OIALRMethod, "inrank": InRankMethod}


def get_method(config: LowRankConfig) -> Method:
    """The method object for `config.method`."""
    return METHOD_CLASSES[config.method](config)


__all__ = ["LayerChange", "Method", "resolve_steps", "get_method", "InRankMethod", "OIALRMethod", "SVDMethod"]
