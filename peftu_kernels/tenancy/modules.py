"""One user's PEFT module in canonical form, and its validation against a model.

A module is a method name, tensors named `<site>.<part>` (site = the HF module path in our T5) and a small
config. What each method's tensors are is defined in its file under tenancy/methods/.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def _method(name: str):
    from . import methods  # the registry imports this module
    return methods.get(name)


@dataclass
class UserModule:
    method: str
    tensors: dict[str, torch.Tensor]
    config: dict = field(default_factory=dict)

    def sites(self) -> list[str]:
        out = []
        for k in self.tensors:
            for suf in _method(self.method).suffixes:
                if k.endswith(suf) and k[: -len(suf)] not in out:
                    out.append(k[: -len(suf)])
        return out

    def numel(self) -> int:
        return _method(self.method).served(self)

    def nbytes(self) -> int:
        return _method(self.method).served_bytes(self)

    @property
    def bank(self) -> str:
        """The key of the bank that serves this module (P-tuning is served as a prompt; adapters per
        activation)."""
        return _method(self.method).bank_key(self)


def validate(mod: UserModule, model, where: str = "module") -> None:
    """Raise ValueError naming what does not fit; nothing is changed."""
    def fail(msg):
        raise ValueError(f"{where}: {msg}")
    from . import methods
    if not isinstance(mod.method, str) or mod.method not in methods.names():
        fail(f"unknown method {mod.method!r}; known: {methods.names()}")
    if not isinstance(mod.tensors, dict) or not mod.tensors:
        fail("has no tensors")
    if not isinstance(mod.config, dict):
        fail(f"config must be a dict, got {type(mod.config).__name__}")
    for k, t in mod.tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{where}.{k}: must be a floating-point tensor, got {getattr(t, 'dtype', type(t))}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{where}.{k}: contains NaN or Inf values")
    methods.get(mod.method).check(mod, model, fail)
