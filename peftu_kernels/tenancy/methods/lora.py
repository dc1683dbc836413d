"""LoRA (Hu et al. 2021): y = W x + scale * B (A x), per user, on any bias-free linear.

Tensors: `<linear>.lora_A` (r, in), `<linear>.lora_B` (out, r); config: r, alpha, use_rslora
(scale alpha / r, or alpha / sqrt(r)). Bank: per site A (S, R, in), B (S, out, R) zero-padded to the widest
rank R, scale (S,), rank (S,). Op: `lora` (ops/reference.py, Triton, CUDA).
HF PEFT: LORA folders; AdapterHub: architecture "lora", composition "add".
"""
from __future__ import annotations

import math

import torch

from ...t5 import Linear
from .. import formats as fm
from ..modules import UserModule
from . import register
from .base import Bank, Method, pad, split_key

# PEFT LoRA options that change nothing at inference; any other option with a value set is refused by name
HARMLESS = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout",
            "use_rslora", "init_lora_weights", "layers_to_transform", "layers_pattern", "megatron_config",
            "megatron_core", "eva_config", "qalora_group_size", "runtime_config", "ensure_weight_tying",
            "rank_pattern", "alpha_pattern"}
UNSUPPORTED = {"use_dora": False, "bias": "none", "modules_to_save": None, "fan_in_fan_out": False,
               "layer_replication": None, "lora_bias": False, "target_parameters": None,
               "trainable_token_indices": None, "use_qalora": False, "alora_invocation_tokens": None,
               "use_bdlora": False, "kasa_config": None, "velora_config": None, "monteclora_config": None,
               "arrow_config": None}
# inits that rewrite the base weights: their adapters are only right on that rewritten base
BASE_CHANGING_INIT = ("pissa", "olora", "loftq", "corda", "lora_ga")
AH_DEFAULTS = {"use_gating": False, "use_dora": False, "leave_out": [], "vera_d": None, "vera_b": None}


def lora_scale(config: dict) -> float:
    r, alpha = config["r"], config.get("alpha", config["r"])
    return alpha / r ** 0.5 if config.get("use_rslora") else alpha / r


class LoraBank(Bank):
    hooks = ("linear_out",)
    order = 20

    def __init__(self, key, model, device, dtype):
        super().__init__(key, model, device, dtype)
        self._stack, self._stack_key = {}, {}

    def nbytes(self):  # the stacked copies of grouped sites' A count too
        return super().nbytes() + sum(a.numel() * a.element_size() for a, _ in self._stack.values())

    def write(self, slot: int, mod: UserModule) -> None:
        self.clear(slot)
        r, scale = mod.config["r"], lora_scale(mod.config)
        for s in mod.sites():
            A, B = mod.tensors[s + ".lora_A"], mod.tensors[s + ".lora_B"]
            if s not in self.sites:
                self.sites[s] = {"A": self._new("A", (r, A.shape[1])), "B": self._new("B", (B.shape[0], r)),
                                 "scale": self._new("scale", ()), "rank": self._new("rank", (), 0, torch.long)}
            g = self.sites[s]
            if g["A"].shape[1] < r:
                g["A"], g["B"] = pad(g["A"], 1, r), pad(g["B"], 2, r)
            g["A"][slot, :r], g["B"][slot, :, :r] = self._t(A), self._t(B)
            g["scale"][slot], g["rank"][slot] = scale, r

    def _read(self, slot, key, v, like):
        s, n = split_key(key)
        g = self.sites[s]
        return g["A"][slot, :v.shape[0]] if n == "lora_A" else g["B"][slot, :, :v.shape[1]]

    def linear_out(self, pb, site, x, y, weight):
        g = self.sites.get(site)
        if g is None:
            return y
        slots, seg = self.slots_of(pb)
        return pb.op["lora"](y, x, g["A"], g["B"], g["scale"], slots, rank=g["rank"], seg=seg)

    fuse_sites = True  # a variant whose rows do more than add (DoRA) turns it off

    def fuses(self, site):
        """The model's sites that always get this site's input, when this bank holds all of them and serves
        (not while training: its A's then change every step, and the stacked copy would be stale)."""
        group = getattr(self.model, "input_groups", {}).get(site) if self.fuse_sites else None
        if not group or len(group) < 2 or any(s not in self.sites for s in group):
            return None
        return None if self.sites[site]["A"].requires_grad else group

    def linear_out_group(self, pb, group, x, ys: dict) -> dict:
        """Every site of `group` at once: one shrink on their stacked A's, their expands in one op."""
        slots, seg = self.slots_of(pb)
        A, offsets = self._stacked(group)
        h = pb.op["lora_shrink"](x, A, None, slots, rank=None, seg=seg)
        gs = [self.sites[s] for s in group]
        out = pb.op["lora_expand_group"]([ys[s] for s in group], h, [g["B"] for g in gs], [offsets[s] for s in group],
                                        slots, [g["rank"] for g in gs], seg)
        return dict(zip(group, out))

    def _stacked(self, group):
        """The group's A's, each times its scale, stacked along R (cached until a slot changes)."""
        for g in [g for g, k in self._stack_key.items() if k[0] != self.epoch]:  # stale: free them now
            del self._stack[g], self._stack_key[g]
        key = (self.epoch, tuple(self.sites[s]["A"].data_ptr() for s in group))
        if self._stack_key.get(group) != key:
            parts, offsets, lo = [], {}, 0
            for s in group:
                g = self.sites[s]
                parts.append(g["A"] * g["scale"][:, None, None].to(g["A"].dtype))
                offsets[s], lo = lo, lo + g["A"].shape[1]
            self._stack[group], self._stack_key[group] = (torch.cat(parts, 1), offsets), key
        return self._stack[group]



class LoRA(Method):
    name, position = "lora", 10
    suffixes = (".lora_A", ".lora_B")
    bank = LoraBank
    paper = dict(r=8, alpha=32, targets=("q", "v"))
    peft_types = ("LORA",)
    adapterhub = ("lora",)

    def check(self, mod, model, fail):
        r = mod.config.get("r")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            fail(f"LoRA rank r must be a positive int, got {r!r}")
        alpha = mod.config.get("alpha", r)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            fail(f"LoRA alpha must be a finite number, got {alpha!r}")
        for k in mod.tensors:
            if not k.endswith(self.suffixes):
                fail(f"unexpected tensor {k!r} for method {mod.method}")
        lin = fm.sites_of(model, Linear)
        for s in mod.sites():
            if s not in lin:
                fail(f"target module {s!r} does not exist in this model")
            A, B = mod.tensors.get(s + ".lora_A"), mod.tensors.get(s + ".lora_B")
            w = lin[s].weight
            if A is None or B is None:
                fail(f"{s} needs both lora_A and lora_B")
            if A.shape != (r, w.shape[1]) or B.shape != (w.shape[0], r):
                fail(f"{s}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit a "
                     f"{w.shape[1]}->{w.shape[0]} linear at rank {r}")

    def init(self, model, g, hp):
        """PEFT's init: A kaiming-uniform(a=sqrt(5)), B zeros."""
        r, t = hp["r"], {}
        for n, m in model.named_modules():
            if isinstance(m, Linear) and n.rsplit(".", 1)[1] in hp["targets"]:
                bound = 1 / math.sqrt(m.in_features)
                t[n + ".lora_A"] = (torch.rand(r, m.in_features, generator=g) * 2 - 1) * bound
                t[n + ".lora_B"] = torch.zeros(m.out_features, r)
        return UserModule(self.name, t, {"r": r, "alpha": hp["alpha"], "use_rslora": hp.get("use_rslora", False)})

    # --- HF PEFT -----------------------------------------------------------------------------------
    # a LoRA variant (a subclass) changes these: the PEFT tensor suffixes it reads (-> canonical part), the
    # config flags that select it, and the options it leaves alone
    peft_parts = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B"}
    peft_flags: dict = {}
    harmless, unsupported = HARMLESS, UNSUPPORTED

    def claims_peft(self, cfg):
        return all(bool(cfg.get(k)) == bool(v) for k, v in {"use_dora": False, **self.peft_flags}.items())

    def from_peft(self, folder, cfg, w, model):
        for k, ok in self.unsupported.items():
            if k not in self.peft_flags and cfg.get(k, ok) not in (ok, None, [], {}):
                fm.bad(folder, f"LoRA option {k}={cfg[k]!r} is not supported")
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            fm.bad(folder, "LoRA rank_pattern / alpha_pattern are not supported (one rank and alpha per user)")
        unknown = {k: v for k, v in cfg.items() if k not in self.harmless and k not in self.unsupported
                   and v not in (None, False, [], {}, "")}
        if unknown:
            fm.bad(folder, f"LoRA option(s) {unknown} are not supported")
        if str(cfg.get("init_lora_weights", True)).lower() in BASE_CHANGING_INIT:
            fm.bad(folder, f"init_lora_weights={cfg['init_lora_weights']!r} rewrites the base weights; save the "
                           f"adapter converted to plain LoRA (PEFT's path_initial_model_for_weight_conversion)")
        r, alpha = cfg.get("r"), cfg.get("lora_alpha", 8)
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            fm.bad(folder, f"LoRA rank r must be a positive int, got {r!r}")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            fm.bad(folder, f"lora_alpha must be a number, got {alpha!r}")
        targets = cfg.get("target_modules")
        t = {}
        for k, v in w.items():
            suf = next((x for x in self.peft_parts if k.endswith(x)), None)
            if suf is None:
                extra = "".join(f" or {p[1:]}" for p in list(self.peft_parts)[2:])
                fm.bad(folder, f"tensor {k!r} is not a LoRA A/B weight{extra} (LoRA variants that save other "
                               f"tensors, such as KaSA or BD-LoRA, are not supported)")
            site = fm.peft_site(folder, k, suf)
            if isinstance(targets, (str, list)) and not fm.targeted(site, targets):
                fm.bad(folder, f"tensor {k!r} is for {site!r}, which target_modules={targets!r} does not name "
                               f"(PEFT refuses this folder too)")
            t[f"{site}.{self.peft_parts[suf]}"] = v
        return UserModule(self.name, t, {"r": r, "alpha": alpha, "use_rslora": bool(cfg.get("use_rslora"))})

    def to_peft(self, mod, model):
        targets = sorted({s.rsplit(".", 1)[1] for s in mod.sites()})
        cfg = {**fm.peft_base_config(), "peft_type": "LORA", "r": mod.config["r"],
               "lora_alpha": mod.config.get("alpha", mod.config["r"]), "use_rslora": mod.config.get("use_rslora", False),
               "target_modules": targets, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
               "init_lora_weights": True, **self.peft_flags}
        suffix = {part: suf for suf, part in self.peft_parts.items()}
        return cfg, {f"{fm.PEFT_PREFIX}{split_key(k)[0]}{suffix[split_key(k)[1]]}": v for k, v in mod.tensors.items()}

    # --- AdapterHub --------------------------------------------------------------------------------
    def claims_adapterhub(self, cfg):
        return cfg.get("composition_mode", "add") != "scale"

    def from_adapterhub(self, folder, cfg, name, w, model):
        fm.check_opts(folder, cfg, AH_DEFAULTS)
        if cfg.get("composition_mode", "add") != "add":
            fm.bad(folder, f"composition_mode {cfg.get('composition_mode')!r} is not supported")
        infix, t = f".loras.{name}.", {}
        for k, v in w.items():
            if infix not in k or k.split(infix)[1] not in ("lora_A", "lora_B"):
                fm.bad(folder, f"unexpected tensor {k!r} for LoRA")
            site, part = k.split(infix)
            t[f"{site}.{part}"] = v.clone()
        return UserModule(self.name, t, {"r": cfg["r"], "alpha": cfg.get("alpha", 8), "format": "adapterhub"})

    def to_adapterhub(self, mod, model, name):
        ks = mod.tensors
        # AdapterHub scales by alpha / r and has no rsLoRA: an rsLoRA user's alpha / sqrt(r) goes into alpha
        r = mod.config["r"]
        cfg = {**AH_DEFAULTS, "architecture": "lora", "composition_mode": "add", "r": r,
               "alpha": lora_scale(mod.config) * r if mod.config.get("use_rslora") else mod.config.get("alpha", r),
               "selfattn_lora": True, "dropout": 0.0,
               "attn_matrices": sorted({k.rsplit(".", 2)[1] for k in ks if ".SelfAttention." in k
                                        or ".EncDecAttention." in k}),
               "intermediate_lora": any(".wi" in k for k in ks), "output_lora": any(".wo." in k for k in ks),
               "init_weights": "lora"}
        return cfg, {f"{split_key(k)[0]}.loras.{name}.{split_key(k)[1]}": v for k, v in ks.items()}


LORA = register(LoRA())
