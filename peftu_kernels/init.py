"""Fresh per-user modules for training, initialised as HF PEFT / AdapterHub do, deterministic per (user, seed).
Each method's init and default hyper-parameters (the PEFT-U paper's where it gives them) live in its file."""
from __future__ import annotations

import hashlib

import torch

from .t5 import T5
from .tenancy import methods
from .tenancy.modules import UserModule


def user_generator(user: str, seed: int) -> torch.Generator:
    h = int.from_bytes(hashlib.sha256(f"{seed}/{user}".encode()).digest()[:8], "little")
    return torch.Generator().manual_seed(h)


def new_module(model: T5, method: str, user: str, seed: int = 42, **hp) -> UserModule:
    """A freshly initialised module of `method` for `user` (same user and seed -> same tensors)."""
    m = methods.get(method)
    return m.init(model, user_generator(user, seed), {**m.paper, **hp})
