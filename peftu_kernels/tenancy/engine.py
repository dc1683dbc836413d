"""The multi-tenant engine: a registry of users, a bank per method, and the per-batch hooks the model calls.

    eng = Engine(model)
    eng.register("alice", lora_module); eng.register("bob", [ia3_module])
    peft = eng.batch(["alice", "bob", None])          # BatchMeta computed once
    logits = model(input_ids, decoder_ids, mask, peft=peft)
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import ops
from ..t5 import T5
from .banks import Bank, make_bank
from .meta import BatchMeta
from .modules import UserModule, validate
from .store import load_user, save_user


class Engine:
    def __init__(self, model: T5, backend: str | None = None, capacity: int | None = None, offload_dir=None,
                 dtype: torch.dtype | None = None):
        """capacity: most users resident in the banks; beyond it the least recently used users are evicted to
        CPU memory (or to `offload_dir` on disk) and reloaded on demand. dtype: the banks' (default the
        model's); training keeps float32 banks under a 16-bit base so that small updates are not rounded away."""
        self.model = model
        p = next(model.parameters())
        self.device, self.dtype = p.device, dtype or p.dtype
        self.backend = ops.resolve(backend, self.device.type)
        self.capacity, self.offload_dir = capacity, Path(offload_dir) if offload_dir else None
        self.banks: dict[str, Bank] = {}
        self.free: dict[str, list[int]] = {}
        self.users: OrderedDict[str, list[UserModule] | None] = OrderedDict()  # LRU order; None = on disk
        self.slots: dict[str, dict[str, int]] = {}  # resident users: user -> bank key -> slot

    # --- registry ----------------------------------------------------------------------------------
    def register(self, user: str, modules, replace: bool = False) -> None:
        """Add (or with replace=True, swap) a user's modules; validated first, so a bad module changes nothing."""
        modules = [modules] if isinstance(modules, UserModule) else list(modules)
        if not isinstance(user, str) or not user:
            raise ValueError(f"user id must be a non-empty string, got {user!r}")
        if user in self.users and not replace:
            raise ValueError(f"user {user!r} is already registered (pass replace=True to swap its modules)")
        keys = [m.bank for m in modules]
        if len(set(keys)) != len(keys):
            raise ValueError(f"user {user!r}: two modules for the same bank {keys}")
        for i, m in enumerate(modules):
            validate(m, self.model, where=f"user {user!r} {m.method} module")
        if user in self.users:
            self.remove(user)
        self.users[user] = modules
        self._make_resident(user, pinned=set())

    def remove(self, user: str) -> None:
        self._known(user)
        self._evict(user)
        del self.users[user]
        if self.offload_dir is not None:
            for f in (self.offload_dir / user).glob("*") if (self.offload_dir / user).is_dir() else []:
                f.unlink()

    def modules(self, user: str) -> list[UserModule]:
        self._known(user)
        if self.users[user] is None:
            return load_user(self.offload_dir / user)
        return self.users[user]

    def _known(self, user):
        if user not in self.users:
            raise KeyError(f"unknown user id {user!r} (registered: {len(self.users)} users)")

    # --- residency ---------------------------------------------------------------------------------
    def _make_resident(self, user: str, pinned: set) -> None:
        self.users.move_to_end(user)
        if user in self.slots:
            return
        if self.capacity is not None and len(self.slots) >= self.capacity:
            victim = next((u for u in self.users if u in self.slots and u not in pinned), None)
            if victim is None:
                raise RuntimeError(f"bank capacity {self.capacity} is smaller than the batch's distinct users")
            self._evict(victim)
            if self.offload_dir is not None:
                save_user(self.offload_dir / victim, self.users[victim])
                self.users[victim] = None
        mods = self.modules(user)
        self.users[user] = mods
        self.slots[user] = {}
        for m in mods:
            bank = self.banks.get(m.bank)
            if bank is None:
                bank = self.banks[m.bank] = make_bank(m.bank, self.device, self.dtype)
                self.free[m.bank] = []
            if not self.free[m.bank]:
                old = bank.slots
                bank.grow(old + 1, self.capacity)
                self.free[m.bank] = list(range(bank.slots - 1, old - 1, -1))
            slot = self.free[m.bank].pop()
            bank.write(slot, m)
            self.slots[user][m.bank] = slot

    def _evict(self, user: str) -> None:
        for key, slot in self.slots.pop(user, {}).items():
            self.banks[key].clear(slot)
            self.free[key].append(slot)

    # --- batches -----------------------------------------------------------------------------------
    def batch(self, users: list[str | None]) -> "PeftBatch":
        """Per-row users (None = base model). Evicted users are reloaded; BatchMeta is built once here."""
        for u in users:
            if u is not None:
                self._known(u)
        pinned = {u for u in users if u is not None}
        for u in dict.fromkeys(u for u in users if u is not None):
            self._make_resident(u, pinned)
        meta = BatchMeta.build([self.slots[u] if u is not None else {} for u in users], self.device)
        return PeftBatch(self, meta)

    # --- reports -----------------------------------------------------------------------------------
    def memory_report(self) -> dict:
        per_user = {}
        for u, mods in self.users.items():
            mods = mods if mods is not None else self.modules(u)
            per_user[u] = {m.method: {"params": m.numel(), "bytes": m.numel() * self.dtype.itemsize} for m in mods}
        floor = sum(self.dtype.itemsize * sum(m.numel() for m in (self.users[u] or [])) for u in self.slots)
        banks = {k: b.nbytes() for k, b in self.banks.items()}
        return {"users": per_user, "banks": banks, "bank_bytes": sum(banks.values()), "resident_floor_bytes": floor,
                "resident_users": len(self.slots), "registered_users": len(self.users)}

    def save(self, user: str, folder) -> None:
        save_user(folder, self.modules(user))


class PeftBatch:
    """The hooks our T5 calls; every one applies the batch's modules per row through the ops."""

    def __init__(self, engine: Engine, meta: BatchMeta):
        self.engine, self.meta, self.banks = engine, meta, engine.banks
        self.op = {name: ops.get(name, engine.backend) for name in ops.OPS}
        self.adapter_keys = [k for k in meta.slots if k.startswith(("houlsby:", "pfeiffer:"))]
        self._prefix_P: dict[str, int] = {}

    def linear(self, site: str, x, weight):
        m = self.meta
        ia3 = self.banks["ia3"].sites.get(site) if m.has("ia3") else None
        if ia3 is not None and "ia3_in" in ia3:
            x_in = self.op["ia3_scale"](x, ia3["ia3_in"], m.slots["ia3"], seg=m.segments["ia3"])
        else:
            x_in = x
        y = F.linear(x_in, weight)
        if ia3 is not None and "ia3_out" in ia3:
            y = self.op["ia3_scale"](y, ia3["ia3_out"], m.slots["ia3"], seg=m.segments["ia3"])
        lora = self.banks["lora"].sites.get(site) if m.has("lora") else None
        if lora is not None:
            y = self.op["lora"](y, x, lora["A"], lora["B"], lora["scale"], m.slots["lora"], rank=lora["rank"],
                                seg=m.segments["lora"])
        return y

    def residual(self, site: str, x, f):
        out = x + f
        for key in self.adapter_keys:
            bank = self.banks[key]
            g = bank.sites.get(site)
            if g is None:
                continue
            h = f if bank.placement == "houlsby" else out
            out = self.op["adapter"](h, out, g["down"], g["down_bias"], g["up"], g["up_bias"], bank.act,
                                     self.meta.slots[key], seg=self.meta.segments[key])
        return out

    def prompt(self, x, mask):
        if not self.meta.has("prompt"):
            return x, mask
        b = self.banks["prompt"]
        return self.op["prompt_prepend"](x, mask, b.prompts, b.lengths, self.meta.slots["prompt"])

    def _prefix_rows(self, stack: str):
        """(slots, this stack's length per row) of the batch's prefix users, or None."""
        if not self.meta.has("prefix"):
            return None
        s = self.meta.slots["prefix"]
        n = torch.where(s >= 0, self.banks["prefix"].lengths[stack][s.clamp(min=0)], 0)
        return s, n

    def prefix_len(self, stack: str) -> int:
        if stack not in self._prefix_P:
            rows = self._prefix_rows(stack)
            self._prefix_P[stack] = int(rows[1].max()) if rows is not None else 0
        return self._prefix_P[stack]

    def prefix_mask(self, stack: str):
        P = self.prefix_len(stack)
        n = self._prefix_rows(stack)[1]
        return torch.arange(P, device=n.device)[None, :] >= (P - n)[:, None]

    def prefix_delta(self, stack: str):
        """Per-row shift of relative positions: a row's own prefix length for AdapterHub users, else 0."""
        s, n = self._prefix_rows(stack)
        ah = self.banks["prefix"].ah[s.clamp(min=0)] & (s >= 0)
        return torch.where(ah, n, 0) if bool(ah.any()) else None

    def prefix_kv(self, site: str, k, v):
        from .banks import prefix_stack
        stack = prefix_stack(site)
        P = self.prefix_len(stack)
        if P == 0:
            return k, v
        b = self.banks["prefix"]
        g = b.sites.get(site)
        if g is None:  # no user of this batch has a prefix here; keep the shapes the mask expects
            z = k.new_zeros(k.shape[0], k.shape[1], P, k.shape[3])
            return torch.cat([z, k], 2), torch.cat([z, v], 2)
        pk, pv, _ = self.op["prefix_gather"](g["k"], g["v"], b.lengths[stack], self.meta.slots["prefix"], P)
        return torch.cat([pk.to(k.dtype), k], 2), torch.cat([pv.to(v.dtype), v], 2)
