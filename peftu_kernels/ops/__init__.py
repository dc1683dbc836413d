"""Multi-tenant ops behind one signature each, dispatched to a backend.

Backends: "reference" (plain PyTorch, defines every op, the CPU path), "triton" and "cuda" (fast kernels,
registered by their packages when importable). "auto" picks the fastest available for the tensors' device.
Choose with the `backend=` argument of the engine or the PEFTU_BACKEND environment variable.

The set of ops is open: an op file registers its reference (`register("reference", {...})`) when imported
(a method file imports the ops it uses), and a backend may implement any registered op; the others fall back
to the reference.
"""
from __future__ import annotations

import os

from . import reference

_BACKENDS: dict[str, dict] = {"reference": {name: getattr(reference, name) for name in
                                             ("lora", "lora_shrink", "lora_expand", "lora_expand_group",
                                              "ia3_scale", "adapter", "prompt_prepend", "prefix_gather")}}
_LOADERS = {"triton": "peftu_kernels.triton", "cuda": "peftu_kernels.cuda"}

# The one rule on arguments, for every op and backend. An op named here may use that argument's storage for
# its result when no gradient is wanted (the Triton and CUDA kernels add into the caller's fresh base output
# instead of allocating one): callers pass a tensor they own there and never read it afterwards, on any
# backend. Every other argument of every op is left exactly as it was. tests/test_op_contract.py runs each
# registered op of each backend on inputs it then reuses (strided views included) against the reference.
CONSUMES = {"lora": "y", "lora_expand": "y", "lora_expand_group": "ys", "dora": "y"}


def names() -> tuple[str, ...]:
    """Every op with a reference (those a backend may implement)."""
    return tuple(_BACKENDS["reference"])


def register(backend: str, table: dict) -> None:
    """Register ops of `backend`; a backend's op needs a reference (registered first) that defines it."""
    if backend != "reference":
        unknown = set(table) - set(_BACKENDS["reference"])
        if unknown:
            raise ValueError(f"backend {backend!r} registers ops {sorted(unknown)} that have no reference")
    _BACKENDS.setdefault(backend, {}).update(table)


def _load(backend: str) -> dict:
    if backend not in _BACKENDS and backend in _LOADERS:
        import importlib
        importlib.import_module(_LOADERS[backend])  # registers itself
    if backend not in _BACKENDS:
        raise ValueError(f"unknown or unavailable backend {backend!r}; known: reference, triton, cuda, auto")
    return _BACKENDS[backend]


def resolve(backend: str | None = None, device_type: str = "cpu") -> str:
    backend = backend or os.environ.get("PEFTU_BACKEND", "auto")
    if backend != "auto":
        _load(backend)
        return backend
    if device_type == "cuda":
        for b in ("triton", "cuda"):
            try:
                _load(b)
                return b
            except (ImportError, ValueError, RuntimeError, OSError):
                continue
    return "reference"


def get(name: str, backend: str = "reference"):
    """The op `name` of `backend`, falling back to the reference where the backend does not implement it."""
    fn = _load(backend).get(name) or _BACKENDS["reference"].get(name)
    if fn is None:
        raise KeyError(f"op {name!r} is not registered (known: {names()}); is the file that defines it imported?")
    return fn
