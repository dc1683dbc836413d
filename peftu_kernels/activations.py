"""The one table of activation functions: name -> (torch function, kernel code).

Every backend reads it: the model's feed-forward (t5.py), the reference ops, the Triton adapter kernel
(`code` is its constexpr) and the CUDA adapter kernel (`code` is its `act` argument; csrc/adapter.cu's switch
is checked against this table by tests/test_activations.py). Aliases map to one canonical name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_TABLE = {  # canonical name: (function, kernel code)
    "identity": (lambda x: x, 0),
    "relu": (F.relu, 1),
    "silu": (F.silu, 2),
    "gelu": (F.gelu, 3),                                          # erf form
    "gelu_new": (lambda x: F.gelu(x, approximate="tanh"), 4),      # tanh approximation (HF's gelu_new)
    "tanh": (torch.tanh, 5),
    "sigmoid": (torch.sigmoid, 6),
}
ALIASES = {"swish": "silu", "gelu_pytorch_tanh": "gelu_new"}
NAMES = tuple(_TABLE) + tuple(ALIASES)


def canonical(name: str) -> str:
    """The table's name for `name` (aliases resolved); KeyError naming the known ones otherwise."""
    name = ALIASES.get(name, name)
    if name not in _TABLE:
        raise KeyError(f"activation {name!r} is not known; known: {sorted(NAMES)}")
    return name


def fn(name: str):
    return _TABLE[canonical(name)][0]


def code(name: str) -> int:
    return _TABLE[canonical(name)][1]


def known(name) -> bool:
    return isinstance(name, str) and (name in _TABLE or name in ALIASES)
