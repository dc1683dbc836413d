"""Banks: every resident user's module of one method stacked along a slot dimension S.

Padding is exact: LoRA ranks and adapter bottlenecks are zero-padded to the bank's widest (zero rows and
columns contribute nothing), IA3 vectors default to 1, prompts and prefixes are right-aligned with a length
per slot (the rest masked). `rank` / `lengths` keep each slot's true size for kernels.
"""
from __future__ import annotations

import torch

from .modules import UserModule


def _pad(t: torch.Tensor, dim: int, size: int, fill: float = 0.0) -> torch.Tensor:
    if t.shape[dim] >= size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, torch.full(shape, fill, dtype=t.dtype, device=t.device)], dim)


class Bank:
    """Base: per-site tensor groups with a leading slot dim; `fills` gives each tensor's neutral value."""
    fills: dict[str, float] = {}

    def __init__(self, key: str, device, dtype):
        self.key, self.device, self.dtype = key, device, dtype
        self.slots = 0
        self.sites: dict[str, dict[str, torch.Tensor]] = {}

    def grow(self, n: int, cap: int | None = None) -> None:
        """At least n slots; doubling amortises growth, and a known capacity caps it (no slack past it)."""
        if n <= self.slots:
            return
        n = max(n, min(max(2 * self.slots, 4), cap or 1 << 62))
        for g in self.sites.values():
            for name, t in g.items():
                g[name] = _pad(t, 0, n, self.fills.get(name, 0.0))
        self._grow_extra(n)
        self.slots = n

    def _grow_extra(self, n):
        pass

    def _new(self, name, shape, fill=None):
        fill = self.fills.get(name, 0.0) if fill is None else fill
        return torch.full((self.slots, *shape), fill, dtype=self.dtype, device=self.device)

    def clear(self, slot: int) -> None:
        for g in self.sites.values():
            for name, t in g.items():
                t[slot] = self.fills.get(name, 0.0)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for g in self.sites.values() for t in g.values()) + self._extra_bytes()

    def _extra_bytes(self) -> int:
        return 0

    def mask_padding_grads(self) -> None:
        """Zero the gradients of padding (units past a slot's own size), which must stay exactly neutral."""

    def _t(self, t):
        return t.to(device=self.device, dtype=self.dtype)


class LoraBank(Bank):
    def write(self, slot: int, mod: UserModule) -> None:
        self.clear(slot)
        r, scale = mod.config["r"], mod.lora_scale()
        for s in mod.sites():
            A, B = mod.tensors[s + ".lora_A"], mod.tensors[s + ".lora_B"]
            if s not in self.sites:
                self.sites[s] = {"A": self._new("A", (r, A.shape[1])), "B": self._new("B", (B.shape[0], r)),
                                 "scale": self._new("scale", ()), "rank": torch.zeros(self.slots, dtype=torch.long,
                                                                                       device=self.device)}
            g = self.sites[s]
            if g["A"].shape[1] < r:
                g["A"], g["B"] = _pad(g["A"], 1, r), _pad(g["B"], 2, r)
            g["A"][slot, :r], g["B"][slot, :, :r] = self._t(A), self._t(B)
            g["scale"][slot], g["rank"][slot] = scale, r

    def clear(self, slot: int) -> None:
        for g in self.sites.values():
            g["A"][slot] = 0
            g["B"][slot] = 0
            g["scale"][slot] = 0
            g["rank"][slot] = 0

    def grow(self, n: int, cap: int | None = None) -> None:
        if n <= self.slots:
            return
        n = max(n, min(max(2 * self.slots, 4), cap or 1 << 62))
        for g in self.sites.values():
            for name in g:
                g[name] = _pad(g[name], 0, n)
        self.slots = n


class IA3Bank(Bank):
    fills = {"ia3_in": 1.0, "ia3_out": 1.0}

    def write(self, slot: int, mod: UserModule) -> None:
        self.clear(slot)
        for k, t in mod.tensors.items():
            s, side = k.rsplit(".", 1)
            g = self.sites.setdefault(s, {})
            if side not in g:
                g[side] = self._new(side, t.shape)
            g[side][slot] = self._t(t)


class AdapterBank(Bank):
    """Bottleneck adapters of one placement ("houlsby": before the residual add, "pfeiffer": after) and one
    activation."""

    def __init__(self, key, device, dtype):
        super().__init__(key, device, dtype)
        self.placement, self.act = key.split(":")
        self.width: dict[str, torch.Tensor] = {}  # site -> each slot's own bottleneck size there (S,)

    def _grow_extra(self, n):
        self.width = {s: _pad(w, 0, n) for s, w in self.width.items()}

    def clear(self, slot: int) -> None:
        super().clear(slot)
        for w in self.width.values():
            w[slot] = 0

    def mask_padding_grads(self) -> None:
        # padded units see act(0), which is not 0 for sigmoid-like activations: their up columns would
        # get gradients and start to contribute, changing the user's module
        for site, g in self.sites.items():
            units = torch.arange(g["down"].shape[1], device=self.device)[None, :] < self.width[site][:, None]
            for n, m in (("down", units[:, :, None]), ("down_bias", units), ("up", units[:, None, :])):
                if g[n].grad is not None:
                    g[n].grad.mul_(m)

    def write(self, slot: int, mod: UserModule) -> None:
        self.clear(slot)
        for s in mod.sites():
            t = {n: mod.tensors[f"{s}.{n}"] for n in ("down", "down_bias", "up", "up_bias")}
            m, D = t["down"].shape
            if s not in self.sites:
                self.sites[s] = {"down": self._new("down", (m, D)), "down_bias": self._new("down_bias", (m,)),
                                 "up": self._new("up", (D, m)), "up_bias": self._new("up_bias", (D,))}
            g = self.sites[s]
            if g["down"].shape[1] < m:
                g["down"], g["down_bias"], g["up"] = _pad(g["down"], 1, m), _pad(g["down_bias"], 1, m), _pad(g["up"], 2, m)
            g["down"][slot, :m], g["down_bias"][slot, :m] = self._t(t["down"]), self._t(t["down_bias"])
            g["up"][slot, :, :m], g["up_bias"][slot] = self._t(t["up"]), self._t(t["up_bias"])
            if s not in self.width:
                self.width[s] = torch.zeros(self.slots, dtype=torch.long, device=self.device)
            self.width[s][slot] = m


class PromptBank(Bank):
    """Prompt tuning and served P-tuning: prompts (S, Pmax, D) right-aligned, lengths (S,)."""

    def __init__(self, key, device, dtype):
        super().__init__(key, device, dtype)
        self.prompts = torch.zeros(0, 0, 0, dtype=dtype, device=device)
        self.lengths = torch.zeros(0, dtype=torch.long, device=device)

    def _grow_extra(self, n):
        self.prompts, self.lengths = _pad(self.prompts, 0, n), _pad(self.lengths, 0, n)

    def write(self, slot: int, mod: UserModule) -> None:
        p = self._t(mod.tensors["prompt"])
        if self.prompts.shape[2] == 0:
            self.prompts = torch.zeros(self.slots, p.shape[0], p.shape[1], dtype=self.dtype, device=self.device)
        if self.prompts.shape[1] < p.shape[0]:  # left-pad so existing users stay right-aligned
            extra = p.shape[0] - self.prompts.shape[1]
            self.prompts = torch.cat([self.prompts.new_zeros(self.slots, extra, p.shape[1]), self.prompts], 1)
        self.clear(slot)
        self.prompts[slot, self.prompts.shape[1] - p.shape[0]:] = p
        self.lengths[slot] = p.shape[0]

    def clear(self, slot: int) -> None:
        if self.prompts.numel():
            self.prompts[slot] = 0
        self.lengths[slot] = 0

    def _extra_bytes(self):
        return self.prompts.numel() * self.prompts.element_size()


def prefix_stack(site: str) -> str:
    """Which attention a prefix site belongs to: encoder self, decoder self or cross."""
    return "cross" if "EncDecAttention" in site else site.split(".")[0]


class PrefixBank(Bank):
    """Prefix tuning: per site k, v (S, H, Pmax, d_kv), right-aligned; per stack each slot's prefix length
    (0 where the user has none there) and per slot its semantics (`ah`: AdapterHub's, whose real keys sit
    after the prefix in T5's relative positions; else PEFT's, whose queries sit after it)."""
    STACKS = ("encoder", "decoder", "cross")

    def __init__(self, key, device, dtype):
        super().__init__(key, device, dtype)
        self.lengths = {st: torch.zeros(0, dtype=torch.long, device=device) for st in self.STACKS}
        self.ah = torch.zeros(0, dtype=torch.bool, device=device)

    def _grow_extra(self, n):
        self.lengths = {st: _pad(t, 0, n) for st, t in self.lengths.items()}
        self.ah = _pad(self.ah, 0, n)

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
            self.lengths[prefix_stack(s)][slot] = P
        self.ah[slot] = mod.config.get("semantics") == "adapterhub"

    def clear(self, slot: int) -> None:
        super().clear(slot)
        for t in self.lengths.values():
            t[slot] = 0
        self.ah[slot] = False


def make_bank(key: str, device, dtype) -> Bank:
    kind = key.split(":")[0]
    cls = {"lora": LoraBank, "ia3": IA3Bank, "houlsby": AdapterBank, "pfeiffer": AdapterBank,
           "prompt": PromptBank, "prefix": PrefixBank}[kind]
    return cls(key, device, dtype)


def read_slot(bank: Bank, slot: int, like: UserModule) -> UserModule:
    """The module in `slot`, in canonical form, with `like`'s names, shapes and config (the inverse of write)."""
    t = {}
    for k, v in like.tensors.items():
        if isinstance(bank, LoraBank):
            s, n = k.rsplit(".", 1)
            r = v.shape[0] if n == "lora_A" else v.shape[1]
            g = bank.sites[s]
            t[k] = g["A"][slot, :r] if n == "lora_A" else g["B"][slot, :, :r]
        elif isinstance(bank, IA3Bank):
            s, n = k.rsplit(".", 1)
            t[k] = bank.sites[s][n][slot]
        elif isinstance(bank, AdapterBank):
            s, n = k.rsplit(".", 1)
            m = like.tensors[f"{s}.down"].shape[0]
            g = bank.sites[s][n]
            t[k] = {"down": lambda: g[slot, :m], "down_bias": lambda: g[slot, :m], "up": lambda: g[slot, :, :m],
                    "up_bias": lambda: g[slot]}[n]()
        elif isinstance(bank, PromptBank):
            if k == "prompt":
                t[k] = bank.prompts[slot, bank.prompts.shape[1] - v.shape[0]:]
            else:
                t[k] = v
        elif isinstance(bank, PrefixBank):
            s, n = k.rsplit(".", 1)
            g = bank.sites[s][n.split("_")[1]]
            t[k] = g[slot, :, g.shape[2] - v.shape[1]:]
    return UserModule(like.method, {k: v.detach().clone().to(like.tensors[k].dtype) for k, v in t.items()},
                      dict(like.config))


def trainable(bank: Bank) -> list[torch.Tensor]:
    """The bank's tensors a trainer optimises (slot dim first); sizes and scales are not parameters."""
    if isinstance(bank, PromptBank):
        return [bank.prompts]
    return [t for g in bank.sites.values() for n, t in g.items() if n not in ("rank", "scale")]
