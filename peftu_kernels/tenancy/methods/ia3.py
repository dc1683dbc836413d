"""IA3 (Liu et al. 2022): per-feature scaling of a linear's output, or of its input (PEFT's feed-forward
targets), per user.

Tensors: `<linear>.ia3_out` (out,) or `<linear>.ia3_in` (in,). Bank: per site and side (S, features),
neutral 1. Op: `ia3_scale`. HF PEFT: IA3 folders (ia3_l (1, in) for feed-forward, (out, 1) otherwise);
AdapterHub: its LoRA architecture with composition "scale" (r 1, output scaling times alpha).
"""
from __future__ import annotations

import torch

from ...t5 import Linear
from .. import formats as fm
from ..modules import UserModule
from . import register
from .base import Bank, Method, split_key
from .lora import AH_DEFAULTS


class IA3Bank(Bank):
    fills = {"ia3_in": 1.0, "ia3_out": 1.0}
    hooks = ("linear_in", "linear_out")
    order = 10

    def write(self, slot: int, mod: UserModule) -> None:
        self.clear(slot)
        for k, t in mod.tensors.items():
            s, side = split_key(k)
            g = self.sites.setdefault(s, {})
            if side not in g:
                g[side] = self._new(side, t.shape)
            g[side][slot] = self._t(t)

    def _read(self, slot, key, v, like):
        s, n = split_key(key)
        return self.sites[s][n][slot]

    def _scale(self, pb, site, side, x):
        g = self.sites.get(site)
        if g is None or side not in g:
            return x
        slots, seg = self.slots_of(pb)
        return pb.op["ia3_scale"](x, g[side], slots, seg=seg)

    def linear_in(self, pb, site, x):
        return self._scale(pb, site, "ia3_in", x)

    def linear_out(self, pb, site, x, y, weight):
        return self._scale(pb, site, "ia3_out", y)


class IA3(Method):
    name, position = "ia3", 40
    suffixes = (".ia3_in", ".ia3_out")
    bank = IA3Bank
    paper = dict(targets=("k", "v", "wo"), feedforward=("wo",))
    peft_types = ("IA3",)
    adapterhub = ("lora",)

    def check(self, mod, model, fail):
        lin = fm.sites_of(model, Linear)
        for k, t in mod.tensors.items():
            if not k.endswith(self.suffixes):
                fail(f"unexpected tensor {k!r} for method {mod.method}")
            s, side = split_key(k)
            if s not in lin:
                fail(f"target module {s!r} does not exist in this model")
            want = lin[s].weight.shape[1 if side == "ia3_in" else 0]
            if t.shape != (want,):
                fail(f"{k} has shape {tuple(t.shape)}, needs ({want},)")

    def init(self, model, g, hp):
        """PEFT's init: ones; feed-forward targets scale their input."""
        t = {}
        for n, m in model.named_modules():
            if isinstance(m, Linear) and n.rsplit(".", 1)[1] in hp["targets"]:
                ff = n.rsplit(".", 1)[1] in hp["feedforward"]
                t[n + (".ia3_in" if ff else ".ia3_out")] = torch.ones(m.in_features if ff else m.out_features)
        return UserModule(self.name, t, {})

    def from_peft(self, folder, cfg, w, model):
        t = {}
        for k, v in w.items():
            s = fm.peft_site(folder, k, ".ia3_l")
            t[f"{s}.ia3_in" if v.shape[0] == 1 else f"{s}.ia3_out"] = v.reshape(-1).clone()
        return UserModule(self.name, t, {})

    def to_peft(self, mod, model):
        sides = {split_key(k)[0]: split_key(k)[1] for k in mod.tensors}
        ff = sorted({s.rsplit(".", 1)[1] for s, side in sides.items() if side == "ia3_in"})
        cfg = {**fm.peft_base_config(), "peft_type": "IA3", "target_modules": sorted({s.rsplit(".", 1)[1] for s in sides}),
               "feedforward_modules": ff, "fan_in_fan_out": False, "init_ia3_weights": True}
        w = {f"{fm.PEFT_PREFIX}{split_key(k)[0]}.ia3_l": (v[None, :] if k.endswith("ia3_in") else v[:, None])
             for k, v in mod.tensors.items()}
        return cfg, w

    def claims_adapterhub(self, cfg):
        return cfg.get("composition_mode") == "scale"

    def from_adapterhub(self, folder, cfg, name, w, model):
        fm.check_opts(folder, cfg, AH_DEFAULTS)
        if cfg.get("r") != 1:
            fm.bad(folder, "IA3 (composition_mode 'scale') needs r == 1")
        infix, alpha, t = f".loras.{name}.", cfg.get("alpha", 1), {}
        for k, v in w.items():
            if not k.endswith(infix + "lora_B"):
                fm.bad(folder, f"unexpected tensor {k!r} for IA3")
            t[k.split(infix)[0] + ".ia3_out"] = v.reshape(-1) * alpha
        return UserModule(self.name, t, {"format": "adapterhub"})

    def to_adapterhub(self, mod, model, name):
        if any(k.endswith(".ia3_in") for k in mod.tensors):
            raise ValueError("IA3 input scaling (PEFT's feed-forward form) has no AdapterHub equivalent")
        cfg = {**AH_DEFAULTS, "architecture": "lora", "composition_mode": "scale", "r": 1, "alpha": 1,
               "selfattn_lora": True, "intermediate_lora": True, "output_lora": False, "attn_matrices": ["k", "v"],
               "init_weights": "ia3", "dropout": 0.0}
        return cfg, {f"{split_key(k)[0]}.loras.{name}.lora_B": v[:, None] for k, v in mod.tensors.items()}


IA3_METHOD = register(IA3())
