"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): A(h) = up act(down h + b) + b', placed
around a sub-layer's residual add, per user.

  houlsby   after self-attention and feed-forward, before the add:  y = x + f + A(f)
  pfeiffer  after the feed-forward only, after the add:             z = x + f; y = z + A(z)
Tensors: `<sublayer>.down` (m, D) `.down_bias` (m) `.up` (D, m) `.up_bias` (D); config: act. A bank per
placement and activation; bottlenecks zero-padded to the widest, with each slot's width kept (padded units
must get no gradient: act(0) is not 0 for sigmoid-like activations). Op: `adapter`.
AdapterHub: bottleneck configs (DoubleSeqBn = Houlsby, SeqBn = Pfeiffer); HF PEFT has no such method.
"""
from __future__ import annotations

import torch

from ... import activations
from ...t5 import SubLayer
from .. import formats as fm
from ..modules import UserModule
from . import register
from .base import Bank, Method, pad, split_key

PARTS = ("down", "down_bias", "up", "up_bias")
AH_DEFAULTS = {"phm_layer": False, "use_gating": False, "ln_before": False, "ln_after": False, "is_parallel": False,
               "cross_adapter": False, "adapter_residual_before_ln": False, "residual_before_ln": True,
               "scaling": 1.0, "inv_adapter": None, "stochastic_depth": 0.0, "leave_out": []}
AH_PARTS = {"adapter_down.0.weight": "down", "adapter_down.0.bias": "down_bias", "adapter_up.weight": "up",
            "adapter_up.bias": "up_bias"}
AH_ACT_OUT = {"silu": "swish"}  # AdapterHub's names where they differ from ours


class AdapterBank(Bank):
    hooks = ("residual",)

    def __init__(self, key, model, device, dtype):
        super().__init__(key, model, device, dtype)
        self.placement, self.act = key.split(":")
        self.order = 40 if self.placement == "houlsby" else 41
        self.width: dict[str, torch.Tensor] = {}  # site -> each slot's own bottleneck size there (S,)

    def _grow_extra(self, n):
        self.width = {s: pad(w, 0, n) for s, w in self.width.items()}

    def clear(self, slot: int) -> None:
        super().clear(slot)
        for w in self.width.values():
            w[slot] = 0

    def mask_padding_grads(self) -> None:
        for site, g in self.sites.items():
            units = torch.arange(g["down"].shape[1], device=self.device)[None, :] < self.width[site][:, None]
            for n, m in (("down", units[:, :, None]), ("down_bias", units), ("up", units[:, None, :])):
                if g[n].grad is not None:
                    g[n].grad.mul_(m)

    def write(self, slot: int, mod: UserModule) -> None:
        self.clear(slot)
        for s in mod.sites():
            t = {n: mod.tensors[f"{s}.{n}"] for n in PARTS}
            m, D = t["down"].shape
            if s not in self.sites:
                self.sites[s] = {"down": self._new("down", (m, D)), "down_bias": self._new("down_bias", (m,)),
                                 "up": self._new("up", (D, m)), "up_bias": self._new("up_bias", (D,))}
                self.width[s] = self._new("width", (), 0, torch.long)
            g = self.sites[s]
            if g["down"].shape[1] < m:
                g["down"], g["down_bias"], g["up"] = pad(g["down"], 1, m), pad(g["down_bias"], 1, m), pad(g["up"], 2, m)
            g["down"][slot, :m], g["down_bias"][slot, :m] = self._t(t["down"]), self._t(t["down_bias"])
            g["up"][slot, :, :m], g["up_bias"][slot] = self._t(t["up"]), self._t(t["up_bias"])
            self.width[s][slot] = m

    def _read(self, slot, key, v, like):
        s, n = split_key(key)
        m = like.tensors[f"{s}.down"].shape[0]
        g = self.sites[s][n]
        return g[slot] if n == "up_bias" else (g[slot, :, :m] if n == "up" else g[slot, :m])

    def residual(self, pb, site, f, out):
        g = self.sites.get(site)
        if g is None:
            return out
        slots, seg = self.slots_of(pb)
        h = f if self.placement == "houlsby" else out
        return pb.op["adapter"](h, out, g["down"], g["down_bias"], g["up"], g["up_bias"], self.act, slots, seg=seg)


class Bottleneck(Method):
    suffixes = tuple("." + p for p in PARTS)
    bank = AdapterBank
    adapterhub = ("bottleneck",)

    def __init__(self, name: str, position: int, paper: dict):
        self.name, self.position, self.paper = name, position, paper

    def bank_key(self, mod):
        return f"{self.name}:{activations.canonical(mod.config.get('act', 'relu'))}"

    def check(self, mod, model, fail):
        if not activations.known(mod.config.get("act", "relu")):
            fail(f"activation {mod.config.get('act')!r} unsupported; known: {sorted(activations.NAMES)}")
        for k in mod.tensors:
            if not k.endswith(self.suffixes):
                fail(f"unexpected tensor {k!r} for method {mod.method}")
        subs, D = fm.sites_of(model, SubLayer), model.cfg.d_model
        for s in mod.sites():
            if s not in subs:
                fail(f"adapter site {s!r} is not a sub-layer of this model")
            t = {n: mod.tensors.get(f"{s}.{n}") for n in PARTS}
            if any(v is None for v in t.values()):
                fail(f"{s} needs down, down_bias, up and up_bias")
            m = t["down"].shape[0]
            for n, want in {"down": (m, D), "down_bias": (m,), "up": (D, m), "up_bias": (D,)}.items():
                if tuple(t[n].shape) != want:
                    fail(f"{s}.{n} has shape {tuple(t[n].shape)}, needs {want}")

    def init(self, model, g, hp):
        """AdapterHub's init: small normal down, near-zero up (starts close to the identity)."""
        D = model.cfg.d_model
        m_dim, t = max(1, D // hp["reduction_factor"]), {}
        for n, m in model.named_modules():
            if not isinstance(m, SubLayer) or m.inner_name == "EncDecAttention":
                continue
            if self.name == "pfeiffer" and m.inner_name != "DenseReluDense":
                continue
            t[n + ".down"], t[n + ".down_bias"] = torch.randn(m_dim, D, generator=g) * 1e-2, torch.zeros(m_dim)
            t[n + ".up"], t[n + ".up_bias"] = torch.randn(D, m_dim, generator=g) * 1e-2, torch.zeros(D)
        return UserModule(self.name, t, {"act": hp["act"], "reduction_factor": hp["reduction_factor"]})

    def claims_adapterhub(self, cfg):
        return self.name == "houlsby"  # one reader for both placements: it tells them apart below

    def from_adapterhub(self, folder, cfg, name, w, model):
        fm.check_opts(folder, cfg, AH_DEFAULTS)
        nl = str(cfg.get("non_linearity", "relu")).lower()
        if not activations.known(nl):
            fm.bad(folder, f"non_linearity {cfg.get('non_linearity')!r} is not supported; known "
                           f"{sorted(activations.NAMES)}")
        if cfg.get("original_ln_after") is not True or not isinstance(cfg.get("reduction_factor"), (int, float)):
            fm.bad(folder, f"original_ln_after={cfg.get('original_ln_after')!r} / reduction_factor="
                           f"{cfg.get('reduction_factor')!r} not supported")
        mh, out, before = (cfg.get(k) for k in ("mh_adapter", "output_adapter", "original_ln_before"))
        if mh and out and not before:
            kind = "houlsby"
        elif out and not mh and before:
            kind = "pfeiffer"
        else:
            fm.bad(folder, f"bottleneck placement mh_adapter={mh}, output_adapter={out}, original_ln_before={before} "
                           f"is neither Houlsby (DoubleSeqBn) nor Pfeiffer (SeqBn)")
        t, infix = {}, f".adapters.{name}."
        for k, v in w.items():
            if infix not in k:
                fm.bad(folder, f"unexpected tensor {k!r}")
            site, rest = k.split(infix)
            if rest not in AH_PARTS:
                fm.bad(folder, f"unexpected tensor {k!r} (only down/up linears are supported)")
            t[f"{site}.{AH_PARTS[rest]}"] = v.clone()
        return UserModule(kind, t, {"act": activations.canonical(nl), "reduction_factor": cfg["reduction_factor"],
                                         "format": "adapterhub"})

    def to_adapterhub(self, mod, model, name):
        m = next(v for k, v in mod.tensors.items() if k.endswith(".down")).shape[0]
        hou, act = self.name == "houlsby", activations.canonical(mod.config["act"])
        cfg = {**AH_DEFAULTS, "architecture": "bottleneck", "mh_adapter": hou, "output_adapter": True,
               "original_ln_before": not hou, "original_ln_after": True, "non_linearity": AH_ACT_OUT.get(act, act),
               "reduction_factor": mod.config.get("reduction_factor", model.cfg.d_model // m), "init_weights": "bert",
               "dropout": 0.0}
        inv = {v: k for k, v in AH_PARTS.items()}
        return cfg, {f"{split_key(k)[0]}.adapters.{name}.{inv[split_key(k)[1]]}": v for k, v in mod.tensors.items()}


HOULSBY = register(Bottleneck("houlsby", 20, dict(reduction_factor=16, act="silu")))
PFEIFFER = register(Bottleneck("pfeiffer", 30, dict(reduction_factor=16, act="relu")))
