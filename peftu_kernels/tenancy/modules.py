"""One user's PEFT module in canonical form: a method name, tensors named `<site>.<part>` (site = the HF module
path in our T5; a few methods also hold site-less tensors such as `prompt`) and a small config. Plain data:
what each method's tensors are, and every question about them, is answered by its file in tenancy/methods/.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class UserModule:
    method: str
    tensors: dict[str, torch.Tensor]
    config: dict = field(default_factory=dict)

    def sites(self) -> list[str]:
        """The sites the module touches, in tensor order (`<site>.<part>` names; site-less tensors have none)."""
        return list(dict.fromkeys(k.rsplit(".", 1)[0] for k in self.tensors if "." in k))


def owned(mod: UserModule, where: str = "module") -> UserModule:
    """A copy that shares nothing with `mod`: tensors detached (no gradient, no autograd history), contiguous,
    in host memory, in new storage; the config deep-copied. Tensors that cannot be served are refused by name
    (not a tensor, on the `meta` device, sparse or otherwise not dense, not a float16/bfloat16/float32/float64
    dtype)."""
    if not isinstance(mod.tensors, dict):
        raise ValueError(f"{where}: tensors must be a dict of name -> tensor, got {type(mod.tensors).__name__}")
    out = {}
    for k, t in mod.tensors.items():
        if not isinstance(k, str):
            raise ValueError(f"{where}: tensor names must be str, got {k!r}")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where}.{k}: must be a floating-point tensor, got {type(t).__name__}")
        if t.device.type == "meta":
            raise ValueError(f"{where}.{k}: is on the meta device (a tensor without values)")
        if t.layout != torch.strided:
            raise ValueError(f"{where}.{k}: must be a dense tensor, got layout {t.layout}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{where}.{k}: must be a floating-point tensor (float16, bfloat16, float32 or "
                             f"float64), got {t.dtype}")
        out[k] = t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    try:
        config = copy.deepcopy(mod.config)
    except Exception as e:
        raise ValueError(f"{where}: config cannot be copied ({type(e).__name__}: {e})") from e
    return UserModule(mod.method, out, config)
