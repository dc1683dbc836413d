"""The method registry: one file per PEFT method in this folder, each registering a `Method`.

Adding a method = a new file here (its Method + Bank, see base.py), its ops (ops/ + optional kernels) and
tests. Files are discovered on import; nothing else needs to name them.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import Bank, Method, TrainView

_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if not method.name or method.name in _REGISTRY:
        raise ValueError(f"method name {method.name!r} is empty or registered twice")
    _REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    m = _REGISTRY.get(name) if isinstance(name, str) else None
    if m is None:
        raise ValueError(f"unknown method {name!r}; known: {names()}")
    return m


def all_methods() -> list[Method]:
    return sorted(_REGISTRY.values(), key=lambda m: (m.position, m.name))


def names() -> tuple[str, ...]:
    return tuple(m.name for m in all_methods())


for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["Bank", "Method", "TrainView", "register", "get", "names", "all_methods"]
