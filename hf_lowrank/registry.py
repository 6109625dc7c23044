"""The registry of rank methods, keyed by `Method.name`.

A leaf module: `config` validates method names against it, and `methods.base.register_method` fills it.
Everything that lists methods (config validation, the scripts' `--lowrank_method` choices, cards, the CLI)
reads it, so a third-party method registered with `hf_lowrank.register_method` appears everywhere.
"""

from __future__ import annotations

_METHODS: dict[str, type] = {}


def register_method(cls: type) -> type:
    """Class decorator: make a `hf_lowrank.methods.Method` subclass available as `LowRankConfig(method=cls.name)`.

    Example::

        @hf_lowrank.register_method
        class MyMethod(hf_lowrank.methods.Method):
            name = "mine"
    """
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name == "base":
        raise ValueError(f"{cls.__name__} needs a class attribute `name` (a non-empty string) to be registered.")
    existing = _METHODS.get(name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"A method named {name!r} is already registered ({existing.__module__}.{existing.__qualname__}).")
    _METHODS[name] = cls
    return cls


def method_names() -> tuple[str, ...]:
    """Names of the registered methods, in registration order."""
    return tuple(_METHODS)


def method_class(name: str) -> type:
    """The registered method class called `name`; a `ValueError` listing the known names otherwise."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"Unknown method {name!r}: choose one of {', '.join(_METHODS) or '(none registered)'}"
                         " (third-party methods: decorate the class with hf_lowrank.register_method).") from None
