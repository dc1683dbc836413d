"""Prefix tuning (Li & Liang 2021): per-user keys/values before the real ones in attention.

Tensors: `<attention>.prefix_k` / `.prefix_v` (H, P, d_kv); config: semantics
  "peft"        PEFT's: decoder self-attention only; queries sit after the prefix in T5's relative positions;
  "adapterhub"  AdapterHub's: encoder / decoder / cross attention (each whole); the real keys sit after it.
Bank: per site k, v (S, H, Pmax, d_kv) right-aligned; per stack each slot's prefix length (0 where the user
has none there) and per slot its semantics, mirrored on the host so that a batch's plan (prefix width, key
mask, position shifts per stack) is built once in Engine.batch without a sync. Op: `prefix_gather`.
HF PEFT: PREFIX_TUNING (seq2seq layout below); AdapterHub: prefix_tuning, MLP-reparameterised or flat.
"""
from __future__ import annotations

import torch

from ... import activations
from ...t5 import Attention
from .. import formats as fm
from ..modules import UserModule
from . import register
from .base import Bank, Method, pad, split_key

STACKS = ("encoder", "decoder", "cross")
AH_DEFAULTS = {"use_gating": False, "leave_out": []}
AH_LOC = {"encoder_prefix": "encoder", "self_prefix": "decoder", "cross_prefix": "cross"}


def prefix_stack(site: str) -> str:
    """Which attention a prefix site belongs to: encoder self, decoder self or cross."""
    return "cross" if "EncDecAttention" in site else site.split(".")[0]


def stack_sites(stack: str, c) -> list[str]:
    if stack == "encoder":
        return [f"encoder.block.{i}.layer.0.SelfAttention" for i in range(c.num_layers)]
    if stack == "decoder":
        return [f"decoder.block.{i}.layer.0.SelfAttention" for i in range(c.n_dec_layers)]
    return [f"decoder.block.{i}.layer.1.EncDecAttention" for i in range(c.n_dec_layers)]


class PrefixBank(Bank):
    hooks = ("prefix",)

    def __init__(self, key, model, device, dtype):
        super().__init__(key, model, device, dtype)
        self.lengths = {st: torch.zeros(0, dtype=torch.long, device=device) for st in STACKS}
        self.host_len: dict[str, list[int]] = {st: [] for st in STACKS}
        self.host_ah: list[bool] = []  # AdapterHub semantics per slot

    def _grow_extra(self, n):
        self.lengths = {st: pad(t, 0, n) for st, t in self.lengths.items()}
        for v in self.host_len.values():
            v += [0] * (n - len(v))
        self.host_ah += [False] * (n - len(self.host_ah))

    def write(self, slot: int, mod: UserModule) -> None:
        self.clear(slot)
        sites = mod.sites()
        H, P, dk = mod.tensors[sites[0] + ".prefix_k"].shape
        Pm = max(P, next(iter(self.sites.values()))["k"].shape[2] if self.sites else 0)
        for s in sites:  # one Pmax for every site, so a batch's prefix length fits all layers
            if s not in self.sites:
                self.sites[s] = {n: self._new(n, (H, Pm, dk)) for n in ("k", "v")}
        for g in self.sites.values():
            for n in ("k", "v"):
                if g[n].shape[2] < Pm:
                    g[n] = torch.cat([g[n].new_zeros(self.slots, H, Pm - g[n].shape[2], dk), g[n]], 2)
        for s in sites:
            g = self.sites[s]
            g["k"][slot, :, Pm - P:] = self._t(mod.tensors[s + ".prefix_k"])
            g["v"][slot, :, Pm - P:] = self._t(mod.tensors[s + ".prefix_v"])
            self.lengths[prefix_stack(s)][slot] = self.host_len[prefix_stack(s)][slot] = P
        self.host_ah[slot] = mod.config.get("semantics") == "adapterhub"

    def clear(self, slot: int) -> None:
        super().clear(slot)
        for st in STACKS:
            self.lengths[st][slot] = self.host_len[st][slot] = 0
        self.host_ah[slot] = False

    def _read(self, slot, key, v, like):
        s, n = split_key(key)
        g = self.sites[s][n.split("_")[1]]
        return g[slot, :, g.shape[2] - v.shape[1]:]

    def plan(self, pb):
        """Per stack: the batch's prefix width P, the (B, P) key mask and, for AdapterHub rows, the (B,)
        shift of relative positions; all from host mirrors, moved to the device once."""
        vals, dev = pb.meta.host[self.key], self.device
        ah = [s >= 0 and self.host_ah[s] for s in vals]
        out = {"ah": torch.tensor(ah).to(dev) if any(ah) else None}
        for st in STACKS:
            n = [self.host_len[st][s] if s >= 0 else 0 for s in vals]
            P, nt = max(n), torch.tensor(n, dtype=torch.long)
            out[st] = {"P": P, "mask": (torch.arange(P)[None, :] >= (P - nt)[:, None]).to(dev),
                       "delta": torch.where(torch.tensor(ah), nt, 0).to(dev) if any(ah) and P else None}
        return out

    def prefix_delta(self, pb, stack, prompt_width: int, length: int, prompt_rows):
        plan = pb.plans[self.key]
        delta = plan[stack]["delta"]
        if delta is None or not prompt_width:
            return delta
        # a row gets only its own prompt; the rest of the batch's prompt width is masked padding that must not
        # move the row's prefix columns relative to its queries (alone, that padding does not exist)
        pad_cols = prompt_width - (prompt_rows if prompt_rows is not None else 0)
        cols = torch.arange(plan[stack]["P"] + length, device=delta.device) < plan[stack]["P"]
        return delta[:, None] + torch.where(plan["ah"], pad_cols, 0)[:, None] * cols[None, :]

    def prefix_kv(self, pb, site, k, v):
        P = pb.plans[self.key][prefix_stack(site)]["P"]
        if P == 0:
            return k, v
        g = self.sites.get(site)
        if g is None:  # no user of this batch has a prefix here; keep the shapes the mask expects
            z = k.new_zeros(k.shape[0], k.shape[1], P, k.shape[3])
            return torch.cat([z, k], 2), torch.cat([z, v], 2)
        pk, pv = pb.op["prefix_gather"](g["k"], g["v"], pb.meta.slots[self.key], P)
        return torch.cat([pk.to(k.dtype), k], 2), torch.cat([pv.to(v.dtype), v], 2)


def _peft_rows(i: int, L: int) -> tuple[int, int]:
    """PEFT's seq2seq layout: decoder self-attention layer i reads rows (4i, 4i+1) mod 2L of the (2L) axis as
    keys / values (so layers i and i + L/2 share a prefix)."""
    return (4 * i) % (2 * L), (4 * i + 1) % (2 * L)


class Prefix(Method):
    name, position = "prefix", 60
    suffixes = (".prefix_k", ".prefix_v")
    bank = PrefixBank
    paper = dict(num_virtual_tokens=20)
    peft_types = ("PREFIX_TUNING",)
    adapterhub = ("prefix_tuning",)

    def needs(self, mod):
        return {"prefix": max(t.shape[1] for t in mod.tensors.values())}

    def check(self, mod, model, fail):
        cfg = model.cfg
        for k in mod.tensors:
            if not k.endswith(self.suffixes):
                fail(f"unexpected tensor {k!r} for method {mod.method}")
        att = fm.sites_of(model, Attention)
        loc = {"encoder": {n for n in att if n.startswith("encoder.")},
               "decoder": {n for n in att if n.startswith("decoder.") and n.endswith("layer.0.SelfAttention")},
               "cross": {n for n in att if n.endswith("EncDecAttention")}}
        sem = mod.config.get("semantics", "peft")
        if sem not in ("peft", "adapterhub"):
            fail(f"prefix semantics {sem!r} unknown (peft or adapterhub)")
        sites = set(mod.sites())
        # PEFT's prefix touches exactly the decoder's self-attention; AdapterHub's any of the three
        # locations, each one whole
        used = [k for k, v in loc.items() if v & sites] if sem == "adapterhub" else ["decoder"]
        want = set().union(*(loc[k] for k in used)) if used else set()
        if not sites or sites != want:
            fail(f"{sem} prefix must cover every layer of {used or 'some attention'}; missing "
                 f"{sorted(want - sites)[:3]}, unknown {sorted(sites - want)[:3]}")
        P = None
        for s in mod.sites():
            for n in ("prefix_k", "prefix_v"):
                t = mod.tensors.get(f"{s}.{n}")
                if t is None or t.dim() != 3 or t.shape[0] != cfg.num_heads or t.shape[2] != cfg.d_kv:
                    fail(f"{s}.{n} must be (heads={cfg.num_heads}, P, d_kv={cfg.d_kv}), got "
                         f"{None if t is None else tuple(t.shape)}")
                if P is not None and t.shape[1] != P:
                    fail(f"{s}.{n} has {t.shape[1]} virtual tokens, other sites {P}")
                P = t.shape[1]

    def init(self, model, g, hp):
        c, P, t = model.cfg, hp["num_virtual_tokens"], {}
        for s in stack_sites("decoder", c):
            t[s + ".prefix_k"] = torch.randn(c.num_heads, P, c.d_kv, generator=g)
            t[s + ".prefix_v"] = torch.randn(c.num_heads, P, c.d_kv, generator=g)
        return UserModule(self.name, t, {"semantics": "peft", "num_layers": c.num_layers})

    # --- HF PEFT -----------------------------------------------------------------------------------
    def from_peft(self, folder, cfg, w, model):
        c = model.cfg
        if cfg.get("prefix_projection") and "prompt_embeddings" not in w:
            fm.bad(folder, "prefix_projection without saved prompt_embeddings")
        p = w.get("prompt_embeddings")
        L, P, D = cfg.get("num_layers"), fm.n_tokens(folder, cfg), cfg.get("token_dim")
        if D != c.inner_dim or cfg.get("num_attention_heads") != c.num_heads:
            fm.bad(folder, f"token_dim={D} / num_attention_heads={cfg.get('num_attention_heads')} do not fit this "
                           f"model's attention ({c.num_heads} heads x {c.d_kv})")
        if not isinstance(L, int) or L < c.n_dec_layers or p is None or tuple(p.shape) != (P, L * 2 * D):
            fm.bad(folder, f"prompt_embeddings {None if p is None else tuple(p.shape)} does not fit num_layers={L}, "
                           f"num_virtual_tokens={P}, token_dim={D} for a {c.n_dec_layers}-layer decoder")
        kv = p.view(P, 2 * L, c.num_heads, c.d_kv).permute(1, 2, 0, 3)  # (2L, H, P, dk)
        t = {}
        for i, s in enumerate(stack_sites("decoder", c)):
            rk, rv = _peft_rows(i, L)
            t[f"{s}.prefix_k"], t[f"{s}.prefix_v"] = kv[rk].clone(), kv[rv].clone()
        return UserModule(self.name, t, {"semantics": "peft", "num_layers": L})

    def to_peft(self, mod, model):
        c = model.cfg
        if mod.config.get("semantics", "peft") != "peft":
            raise ValueError("an AdapterHub prefix (encoder / cross, keys after the prefix) has no HF PEFT form")
        L = mod.config.get("num_layers", c.num_layers)
        first = mod.tensors["decoder.block.0.layer.0.SelfAttention.prefix_k"]
        H, P, dk = first.shape
        kv, seen = torch.zeros(2 * L, H, P, dk, dtype=first.dtype), {}
        for i, s in enumerate(stack_sites("decoder", c)):
            for row, t in zip(_peft_rows(i, L), (mod.tensors[s + ".prefix_k"], mod.tensors[s + ".prefix_v"])):
                if row in seen and not torch.equal(seen[row], t):
                    raise ValueError(f"prefix of decoder layer {i} differs from another layer that PEFT's layout "
                                     f"makes it share (row {row} of {2 * L}); this module cannot be written as a "
                                     f"PEFT folder")
                seen[row] = kv[row] = t
        cfg = {**fm.peft_base_config(), "peft_type": "PREFIX_TUNING", "num_virtual_tokens": P, "token_dim": H * dk,
               "num_transformer_submodules": 2, "num_attention_heads": H, "num_layers": L, "prefix_projection": False,
               "encoder_hidden_size": H * dk}
        return cfg, {"prompt_embeddings": kv.permute(2, 0, 1, 3).reshape(P, 2 * L * H * dk)}

    # --- AdapterHub --------------------------------------------------------------------------------
    def from_adapterhub(self, folder, cfg, name, w, model):
        fm.check_opts(folder, cfg, AH_DEFAULTS)
        c, P = model.cfg, cfg.get("prefix_length")
        if not isinstance(P, int) or isinstance(P, bool) or P < 1:
            fm.bad(folder, f"prefix_length must be a positive int, got {P!r}")
        H, dk = c.num_heads, c.d_kv
        nl = str(cfg.get("non_linearity", "tanh")).lower()
        pool, t = f"prefix_tuning.prefix_tunings.{name}.", {}
        for key, stack in AH_LOC.items():
            p = pool + key + "."
            if cfg.get("flat"):
                flat = w.get(p + "control_trans")
                if flat is None:
                    continue
                if flat.numel() % (P * H * dk):
                    fm.bad(folder, f"{key}: control_trans has {flat.numel()} values, not a multiple of prefix_length "
                                   f"{P} x {H} heads x {dk} (is prefix_length right?)")
                kv = flat.reshape(P, -1, H, dk)
            else:
                if p + "wte.weight" not in w:
                    continue
                if not activations.known(nl):
                    fm.bad(folder, f"non_linearity {cfg.get('non_linearity')!r} is not supported")
                need = [p + n for n in ("control_trans.0.weight", "control_trans.0.bias", "control_trans.2.weight",
                                        "control_trans.2.bias")]
                if [n for n in need if n not in w]:
                    fm.bad(folder, f"{key}: MLP prefix without {[n for n in need if n not in w]}")
                if w[p + "wte.weight"].shape[0] != P:
                    fm.bad(folder, f"{key}: wte has {w[p + 'wte.weight'].shape[0]} rows, prefix_length is {P}")
                if w[p + "control_trans.2.weight"].shape[0] % (H * dk):
                    fm.bad(folder, f"{key}: control_trans output {w[p + 'control_trans.2.weight'].shape[0]} does "
                                   f"not split into {H} heads x {dk}")
                with torch.no_grad():
                    h = activations.fn(nl)(w[p + "wte.weight"] @ w[p + "control_trans.0.weight"].T
                                           + w[p + "control_trans.0.bias"])
                    kv = (h @ w[p + "control_trans.2.weight"].T + w[p + "control_trans.2.bias"]).view(P, -1, H, dk)
            kv = kv.permute(1, 2, 0, 3)  # (layers * 2, H, P, dk)
            sites = stack_sites(stack, c)
            if kv.shape[0] != 2 * len(sites):
                fm.bad(folder, f"{key} has {kv.shape[0] // 2} layers, the model's {stack} has {len(sites)}")
            for i, s in enumerate(sites):
                t[f"{s}.prefix_k"], t[f"{s}.prefix_v"] = kv[2 * i].clone(), kv[2 * i + 1].clone()
        if not t:
            fm.bad(folder, f"no prefix weights for adapter {name!r}")
        return UserModule(self.name, t, {"semantics": "adapterhub", "format": "adapterhub"})

    def to_adapterhub(self, mod, model, name):
        if mod.config.get("semantics") != "adapterhub":
            return super().to_adapterhub(mod, model, name)
        c = model.cfg
        P = next(iter(mod.tensors.values())).shape[1]
        w, flags = {}, {}
        for key, stack in AH_LOC.items():
            sites = stack_sites(stack, c)
            flags[key] = sites[0] + ".prefix_k" in mod.tensors
            if not flags[key]:
                continue
            kv = torch.stack([mod.tensors[f"{s}.prefix_{n}"] for s in sites for n in ("k", "v")])  # (2L, H, P, dk)
            w[f"prefix_tuning.prefix_tunings.{name}.{key}.control_trans"] = kv.permute(2, 0, 1, 3).reshape(-1)
        cfg = {**AH_DEFAULTS, "architecture": "prefix_tuning", "flat": True, "prefix_length": P,
               "encoder_prefix": flags["encoder_prefix"], "cross_prefix": flags["cross_prefix"],
               "bottleneck_size": 512, "non_linearity": "tanh", "dropout": 0.0, "shared_gating": True}
        return cfg, w


PREFIX = register(Prefix())
