"""Rank methods: each decides what to change; `surgery` applies it. Methods are found through the registry
(`hf_lowrank.register_method`), so a third-party method is used exactly like the built-in ones."""

from ..config import LowRankConfig
from ..registry import method_class, method_names, register_method
from .base import LayerChange, Method, resolve_steps
from .inrank import InRankMethod
from .oialr import OIALRMethod
from .svd import SVDMethod


def get_method(config: LowRankConfig) -> Method:
    """The method object for `config.method`."""
    return method_class(config.method)(config)


__all__ = ["LayerChange", "Method", "register_method", "resolve_steps", "get_method", "method_class",
           "method_names", "InRankMethod", "OIALRMethod", "SVDMethod"]
