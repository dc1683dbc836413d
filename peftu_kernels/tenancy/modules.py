"""One user's PEFT module in canonical form, and its validation against a model.

Canonical tensor names (site = the HF module path in our T5):
  lora      {linear}.lora_A (r, in)  {linear}.lora_B (out, r)         config: r, alpha, use_rslora
  ia3       {linear}.ia3_in (in,) or {linear}.ia3_out (out,)          (PEFT: feed-forward sites scale the input)
  houlsby   {sublayer}.down (m, D) .down_bias (m) .up (D, m) .up_bias (D)   y = x + f + A(f)
  pfeiffer  same tensors                                               z = x + f; y = z + A(z)
            config: act (relu, swish, gelu, ...)
  prompt    prompt (P, D)                                              prompt tuning
  ptuning   prompt (P, D), served like prompt tuning; prompt_encoder.* (its encoder, for training)
  prefix    {attention}.prefix_k (H, P, d_kv) .prefix_v                config: semantics ("peft": decoder
            self-attention, queries after the prefix; "adapterhub": encoder / decoder / cross attention,
            real keys after the prefix in T5's relative positions)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ops.reference import ACT
from ..t5 import T5, Attention, Linear, SubLayer

METHODS = ("lora", "ia3", "houlsby", "pfeiffer", "prompt", "ptuning", "prefix")
_SUFFIX = {"lora": (".lora_A", ".lora_B"), "ia3": (".ia3_in", ".ia3_out"),
           "houlsby": (".down", ".down_bias", ".up", ".up_bias"), "pfeiffer": (".down", ".down_bias", ".up", ".up_bias"),
           "prefix": (".prefix_k", ".prefix_v")}


@dataclass
class UserModule:
    method: str
    tensors: dict[str, torch.Tensor]
    config: dict = field(default_factory=dict)

    def sites(self) -> list[str]:
        out = []
        for k in self.tensors:
            for suf in _SUFFIX.get(self.method, ()):
                if k.endswith(suf) and k[: -len(suf)] not in out:
                    out.append(k[: -len(suf)])
        return out

    def numel(self) -> int:
        return sum(t.numel() for k, t in self.tensors.items() if not k.startswith("prompt_encoder."))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for k, t in self.tensors.items() if not k.startswith("prompt_encoder."))

    @property
    def bank(self) -> str:
        """The bank that serves this module (P-tuning is served as a prompt; adapters per activation)."""
        if self.method == "ptuning":
            return "prompt"
        if self.method in ("houlsby", "pfeiffer"):
            return f"{self.method}:{self.config.get('act', 'relu')}"
        return self.method

    def lora_scale(self) -> float:
        r, alpha = self.config["r"], self.config.get("alpha", self.config["r"])
        return alpha / r ** 0.5 if self.config.get("use_rslora") else alpha / r


def _fail(where: str, msg: str):
    raise ValueError(f"{where}: {msg}")


def _modules_of(model: T5, kind) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, kind)}


def validate(mod: UserModule, model: T5, where: str = "module") -> None:
    """Raise ValueError naming what does not fit; nothing is changed."""
    cfg = model.cfg
    if mod.method not in METHODS:
        _fail(where, f"unknown method {mod.method!r}; known: {METHODS}")
    if not mod.tensors:
        _fail(where, "has no tensors")
    for k, t in mod.tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            _fail(f"{where}.{k}", f"must be a floating-point tensor, got {getattr(t, 'dtype', type(t))}")
        if not torch.isfinite(t).all():
            _fail(f"{where}.{k}", "contains NaN or Inf values")
    known = set(_SUFFIX.get(mod.method, ()))
    if mod.method in ("prompt", "ptuning"):
        p = mod.tensors.get("prompt")
        if p is None or p.dim() != 2 or p.shape[1] != cfg.d_model or p.shape[0] < 1:
            _fail(where, f"needs 'prompt' of shape (P>=1, d_model={cfg.d_model}), got "
                         f"{None if p is None else tuple(p.shape)}")
        extra = [k for k in mod.tensors if k != "prompt" and not k.startswith("prompt_encoder.")]
        if extra:
            _fail(where, f"unexpected tensors {extra}")
        return
    for k in mod.tensors:
        if not any(k.endswith(s) for s in known):
            _fail(where, f"unexpected tensor {k!r} for method {mod.method}")
    if mod.method == "lora":
        r = mod.config.get("r")
        if not isinstance(r, int) or r < 1:
            _fail(where, f"LoRA rank r must be a positive int, got {r!r}")
        lin = _modules_of(model, Linear)
        for s in mod.sites():
            if s not in lin:
                _fail(where, f"target module {s!r} does not exist in this model")
            A, B = mod.tensors.get(s + ".lora_A"), mod.tensors.get(s + ".lora_B")
            w = lin[s].weight
            if A is None or B is None:
                _fail(where, f"{s} needs both lora_A and lora_B")
            if A.shape != (r, w.shape[1]) or B.shape != (w.shape[0], r):
                _fail(where, f"{s}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit a "
                             f"{w.shape[1]}->{w.shape[0]} linear at rank {r}")
    elif mod.method == "ia3":
        lin = _modules_of(model, Linear)
        for k, t in mod.tensors.items():
            s, side = k.rsplit(".", 1)
            if s not in lin:
                _fail(where, f"target module {s!r} does not exist in this model")
            want = lin[s].weight.shape[1 if side == "ia3_in" else 0]
            if t.shape != (want,):
                _fail(where, f"{k} has shape {tuple(t.shape)}, needs ({want},)")
    elif mod.method in ("houlsby", "pfeiffer"):
        if mod.config.get("act", "relu") not in ACT:
            _fail(where, f"activation {mod.config.get('act')!r} unsupported; known: {sorted(ACT)}")
        subs = _modules_of(model, SubLayer)
        for s in mod.sites():
            if s not in subs:
                _fail(where, f"adapter site {s!r} is not a sub-layer of this model")
            t = {n: mod.tensors.get(f"{s}.{n}") for n in ("down", "down_bias", "up", "up_bias")}
            if any(v is None for v in t.values()):
                _fail(where, f"{s} needs down, down_bias, up and up_bias")
            m, D = t["down"].shape[0], cfg.d_model
            shapes = {"down": (m, D), "down_bias": (m,), "up": (D, m), "up_bias": (D,)}
            for n, want in shapes.items():
                if tuple(t[n].shape) != want:
                    _fail(where, f"{s}.{n} has shape {tuple(t[n].shape)}, needs {want}")
    elif mod.method == "prefix":
        att = _modules_of(model, Attention)
        loc = {"encoder": {n for n in att if n.startswith("encoder.")},
               "decoder": {n for n in att if n.startswith("decoder.") and n.endswith("layer.0.SelfAttention")},
               "cross": {n for n in att if n.endswith("EncDecAttention")}}
        sem = mod.config.get("semantics", "peft")
        if sem not in ("peft", "adapterhub"):
            _fail(where, f"prefix semantics {sem!r} unknown (peft or adapterhub)")
        sites = set(mod.sites())
        # PEFT's prefix touches exactly the decoder's self-attention; AdapterHub's any of the three
        # locations, each one whole
        used = [k for k, v in loc.items() if v & sites] if sem == "adapterhub" else ["decoder"]
        want = set().union(*(loc[k] for k in used)) if used else set()
        if not sites or sites != want:
            _fail(where, f"{sem} prefix must cover every layer of {used or 'some attention'}; missing "
                         f"{sorted(want - sites)[:3]}, unknown {sorted(sites - want)[:3]}")
        P = None
        for s in mod.sites():
            for n in ("prefix_k", "prefix_v"):
                t = mod.tensors.get(f"{s}.{n}")
                if t is None or t.dim() != 3 or t.shape[0] != cfg.num_heads or t.shape[2] != cfg.d_kv:
                    _fail(where, f"{s}.{n} must be (heads={cfg.num_heads}, P, d_kv={cfg.d_kv}), got "
                                 f"{None if t is None else tuple(t.shape)}")
                if P is not None and t.shape[1] != P:
                    _fail(where, f"{s}.{n} has {t.shape[1]} virtual tokens, other sites {P}")
                P = t.shape[1]
