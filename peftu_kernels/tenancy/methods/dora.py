"""DoRA (Liu et al. 2024): weight-decomposed LoRA, y = m * (W + s B A) x / ||W + s B A||_row, per user.

Tensors: LoRA's `<linear>.lora_A` (r, in), `.lora_B` (out, r), plus `.magnitude` (out,); config as LoRA.
Bank: LoRA's layout plus per site `m` (S, out) and `norm` (S, out), the user's row norms against the base
weight, computed once when the user is written (ops/dora.py::dora_norm; never a full weight per row) and,
while training, refreshed before every forward from the current A and B (detached, as in the paper and PEFT:
the norm gets no gradient, the magnitude does). Op: `dora` (reference, Triton).
HF PEFT: LORA folders with use_dora=True (tensor `lora_magnitude_vector`). No serving system mixes DoRA users
in one batch today; here a DoRA row sits beside any other method's rows.
"""
from __future__ import annotations

import torch

from ...ops import dora as dora_ops
from ..modules import UserModule
from . import register
from .base import TrainView, split_key
from .lora import HARMLESS, LoRA, LoraBank


class DoraBank(LoraBank):
    fills = {"m": 1.0, "norm": 1.0}
    order = 30  # after LoRA: its gain scales the row's whole output
    fuse_sites = False

    def _weight(self, site):
        return self.model.get_submodule(site).weight

    def write(self, slot: int, mod: UserModule) -> None:
        super().write(slot, mod)
        for s in mod.sites():
            g = self.sites[s]
            if "m" not in g:
                g["m"], g["norm"] = self._new("m", g["B"].shape[1:2]), self._new("norm", g["B"].shape[1:2])
            g["m"][slot] = self._t(mod.tensors[s + ".magnitude"])
        self.refresh([slot], sites=mod.sites())

    @torch.no_grad()
    def refresh(self, slots: list[int], sites=None) -> None:
        """Recompute the slots' row norms from their current A, B (and the base weight)."""
        idx = torch.tensor(slots, device=self.device)
        for s in sites or list(self.sites):
            g = self.sites[s]
            n = dora_ops.dora_norm(self._weight(s), g["A"][idx], g["B"][idx], g["scale"][idx])
            g["norm"][idx] = n.to(g["norm"].dtype)

    def _read(self, slot, key, v, like):
        s, n = split_key(key)
        return self.sites[s]["m"][slot] if n == "magnitude" else super()._read(slot, key, v, like)

    def trainable(self):
        return [t for g in self.sites.values() for n, t in g.items() if n in ("A", "B", "m")]

    def linear_out(self, pb, site, x, y, weight):
        g = self.sites.get(site)
        if g is None:
            return y
        slots, seg = self.slots_of(pb)
        gain = g["m"] / g["norm"]  # (S, out); the graph reaches m while training
        return pb.op["dora"](y, x, g["A"], g["B"], g["scale"], gain, slots, rank=g["rank"], seg=seg)


class DoraView(TrainView):
    def before_forward(self, users):
        self.bank.refresh([self.slot[u] for u in users])


class DoRA(LoRA):
    name, position = "dora", 80
    suffixes = (".lora_A", ".lora_B", ".magnitude")
    bank = DoraBank
    in_paper = False  # not one of PEFT-U's methods: `--methods dora` asks for it
    peft_parts = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", ".lora_magnitude_vector": "magnitude"}
    peft_flags = {"use_dora": True}
    harmless = HARMLESS | {"use_dora"}
    peft_priority = 1
    adapterhub = ()

    def check(self, mod, model, fail):
        super().check(mod, model, fail)
        for s in mod.sites():
            m, out = mod.tensors.get(s + ".magnitude"), model.get_submodule(s).weight.shape[0]
            if m is None or tuple(m.shape) != (out,):
                fail(f"{s}: DoRA needs magnitude of shape ({out},), got {None if m is None else tuple(m.shape)}")

    def init(self, model, g, hp):
        """PEFT's init: LoRA's (B = 0), magnitude = the base weight's row norms (so it starts as the base)."""
        mod = super().init(model, g, hp)
        for s in list(mod.sites()):
            mod.tensors[s + ".magnitude"] = model.get_submodule(s).weight.detach().float().norm(dim=1).cpu()
        return UserModule(self.name, mod.tensors, mod.config)

    def train_view(self, bank, slots, init):
        return DoraView(bank, slots, init)


DORA = register(DoRA())
