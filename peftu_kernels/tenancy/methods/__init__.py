"""The method registry: one file per PEFT method in this folder, each registering a `Method`.

Adding a method = a new file here (its Method + Bank, see base.py), its ops (ops/ + optional kernels) and
tests. Files are discovered on import; nothing else needs to name them.
"""
from __future__ import annotations

import importlib
import pkgutil

import torch

from ..modules import UserModule
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


def validate(mod: UserModule, model, where: str = "module") -> None:
    """Raise ValueError naming what does not fit `model`; nothing is changed."""
    def fail(msg):
        raise ValueError(f"{where}: {msg}")
    if not isinstance(mod.method, str) or mod.method not in _REGISTRY:
        fail(f"unknown method {mod.method!r}; known: {names()}")
    if not isinstance(mod.tensors, dict) or not mod.tensors:
        fail("has no tensors")
    if not isinstance(mod.config, dict):
        fail(f"config must be a dict, got {type(mod.config).__name__}")
    for k, t in mod.tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{where}.{k}: must be a floating-point tensor, got {getattr(t, 'dtype', type(t))}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{where}.{k}: contains NaN or Inf values")
    get(mod.method).check(mod, model, fail)


def needs_of(mods: list[UserModule]) -> dict[str, int]:
    """What serving a user's modules costs beyond weights: each Method.needs, summed."""
    out: dict[str, int] = {}
    for m in mods:
        for k, v in get(m.method).needs(m).items():
            out[k] = out.get(k, 0) + v
    return out


def all_methods() -> list[Method]:
    return sorted(_REGISTRY.values(), key=lambda m: (m.position, m.name))


def names() -> tuple[str, ...]:
    return tuple(m.name for m in all_methods())


for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["Bank", "Method", "TrainView", "register", "get", "names", "all_methods", "validate", "needs_of"]
