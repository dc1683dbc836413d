"""The multi-tenant engine: a registry of users, a bank per method, and the per-batch hooks the model calls.

    eng = Engine(model)
    eng.register("alice", lora_module); eng.register("bob", [ia3_module])
    peft = eng.batch(["alice", "bob", None])          # BatchMeta computed once
    logits = model(input_ids, decoder_ids, mask, peft=peft)
"""
from __future__ import annotations

import itertools
import secrets
import shutil
import weakref
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import ops
from ..t5 import T5
from .banks import Bank, make_bank
from .ids import check_id
from .meta import BatchMeta
from .modules import UserModule, validate
from .store import UserStore, save_user


class StaleBatchError(RuntimeError):
    """A batch handle whose users' slots changed after it was built (removed, replaced or evicted)."""


class Engine:
    def __init__(self, model: T5, backend: str | None = None, capacity: int | None = None, offload_dir=None,
                 dtype: torch.dtype | None = None):
        """capacity: most users resident in the banks; beyond it the least recently used users are evicted to
        CPU memory (or to `offload_dir` on disk) and reloaded on demand. dtype: the banks' (default the
        model's); training keeps float32 banks under a 16-bit base so that small updates are not rounded away.
        The engine writes its offloaded users to a folder of its own under `offload_dir` (removed by
        `close()` or when the engine is collected), so engines sharing `offload_dir` never read each other's."""
        if capacity is not None and (not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1):
            raise ValueError(f"capacity must be a positive int (most resident users) or None, got {capacity!r}")
        self.model = model
        p = next(model.parameters())
        self.device, self.dtype = p.device, dtype or p.dtype
        self.backend = ops.resolve(backend, self.device.type)
        self.capacity, self.store = capacity, None
        if offload_dir is not None:
            self.store = UserStore(Path(offload_dir) / f"engine-{secrets.token_hex(6)}")
            self._cleanup = weakref.finalize(self, shutil.rmtree, self.store.root, True)
        self.banks: dict[str, Bank] = {}
        self.free: dict[str, list[int]] = {}
        self.users: OrderedDict[str, list[UserModule] | None] = OrderedDict()  # LRU order; None = on disk
        self.slots: dict[str, dict[str, int]] = {}  # resident users: user -> bank key -> slot
        self._tokens = itertools.count(1)
        self.residency: dict[str, int] = {}  # resident user -> token of this residency (new on every load)
        self.version = 0  # bumped whenever any user leaves its slots: batch handles re-check then

    @property
    def offload_dir(self) -> Path | None:
        return self.store.root if self.store is not None else None

    def close(self) -> None:
        """Remove this engine's offload folder (its users stay registered only while resident)."""
        if self.store is not None:
            self._cleanup()

    # --- registry ----------------------------------------------------------------------------------
    def register(self, user: str, modules, replace: bool = False) -> None:
        """Add (or with replace=True, swap) a user's modules. All or nothing: on any error the registry, the
        banks and the files are as they were."""
        user = check_id(user)
        modules = self._checked(user, modules)
        if user in self.users and not replace:
            raise ValueError(f"user {user!r} is already registered (pass replace=True to swap its modules)")
        order = list(self.users.items())
        old = self.users.get(user)
        was_resident = user in self.slots
        try:
            self._release(user)
            self.users[user] = modules
            self._make_resident(user, pinned={user})
        except BaseException:
            self._release(user)
            self.users = OrderedDict(order)
            if was_resident:  # its slots were freed above, so this needs no eviction
                self.users[user] = old
                self._make_resident(user, pinned={user})
                self.users = OrderedDict(order)
            raise
        if self.store is not None and self.store.has(user):
            self.store.remove(user)  # the replaced set's disk copy

    def _checked(self, user: str, modules) -> list[UserModule]:
        if isinstance(modules, UserModule):
            modules = [modules]
        if not isinstance(modules, (list, tuple)) or not all(isinstance(m, UserModule) for m in modules):
            raise TypeError(f"user {user!r}: modules must be a UserModule or a list of them, got "
                            f"{type(modules).__name__}")
        if not modules:
            raise ValueError(f"user {user!r}: no modules given (a user needs at least one)")
        keys = [m.bank for m in modules]
        if len(set(keys)) != len(keys):
            raise ValueError(f"user {user!r}: two modules for the same bank {keys}")
        for m in modules:
            validate(m, self.model, where=f"user {user!r} {m.method} module")
        return list(modules)

    def remove(self, user: str) -> None:
        self._known(user)
        if self.store is not None and self.store.has(user):
            self.store.remove(user)  # raises before anything else changes if the disk refuses
        self._release(user)
        del self.users[user]

    def modules(self, user: str) -> list[UserModule]:
        self._known(user)
        if self.users[user] is None:
            return self.store.load(user)
        return self.users[user]

    def _known(self, user):
        if user not in self.users:
            raise KeyError(f"unknown user id {user!r} (registered: {len(self.users)} users)")

    # --- residency ---------------------------------------------------------------------------------
    def _make_resident(self, user: str, pinned: set) -> None:
        self.users.move_to_end(user)
        if user in self.slots:
            return
        mods = self.modules(user)  # read (maybe from disk) before evicting anyone
        if self.capacity is not None and len(self.slots) >= self.capacity:
            victim = next((u for u in self.users if u in self.slots and u not in pinned), None)
            if victim is None:
                raise RuntimeError(f"bank capacity {self.capacity} is smaller than the batch's distinct users")
            if self.store is not None:
                self.store.save(victim, self.users[victim])  # saved before its slots are freed
            self._release(victim)
            if self.store is not None:
                self.users[victim] = None
        self.slots[user] = {}
        try:
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
                self.slots[user][m.bank] = slot
                bank.write(slot, m)
        except BaseException:
            self._release(user)
            raise
        self.users[user] = mods
        self.residency[user] = next(self._tokens)

    def _release(self, user: str) -> None:
        """Free the user's slots (cleared, so no later batch can read its weights there)."""
        if user not in self.slots:
            return
        self.version += 1
        self.residency.pop(user, None)
        for key, slot in self.slots.pop(user).items():
            self.banks[key].clear(slot)
            self.free[key].append(slot)

    # --- batches -----------------------------------------------------------------------------------
    def batch(self, users: list[str | None]) -> "PeftBatch":
        """Per-row users (None = base model). Evicted users are reloaded; BatchMeta is built once here. The
        handle serves only while its users keep their slots: afterwards it raises StaleBatchError."""
        if isinstance(users, str) or not isinstance(users, (list, tuple)):
            raise TypeError(f"Engine.batch takes a list of user ids (None = base model), got {type(users).__name__}")
        if not users:
            raise ValueError("Engine.batch: the batch has no rows")
        for i, u in enumerate(users):
            if u is not None:
                check_id(u, f"row {i}'s user id")
                self._known(u)
        distinct = list(dict.fromkeys(u for u in users if u is not None))
        if self.capacity is not None and len(distinct) > self.capacity:
            raise RuntimeError(f"bank capacity {self.capacity} is smaller than the batch's {len(distinct)} "
                               f"distinct users")
        for u in distinct:
            self._make_resident(u, set(distinct))
        sizes = {k: b.slots for k, b in self.banks.items()}
        meta = BatchMeta.build([self.slots[u] if u is not None else {} for u in users], self.device, sizes)
        return PeftBatch(self, meta, {u: self.residency[u] for u in distinct})

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
        save_user(folder, self.modules(user), user)


class PeftBatch:
    """The hooks our T5 calls; every one applies the batch's modules per row through the ops."""

    def __init__(self, engine: Engine, meta: BatchMeta, residency: dict[str, int]):
        self.engine, self.meta, self.banks = engine, meta, engine.banks
        self._residency, self._version = residency, engine.version
        self.op = {name: ops.get(name, engine.backend) for name in ops.OPS}
        self.adapter_keys = [k for k in meta.slots if k.startswith(("houlsby:", "pfeiffer:"))]
        self._prefix_P: dict[str, int] = {}

    def check(self, rows: int) -> None:
        """Called by the model's entry points: the input must have this handle's rows, and every user of the
        handle must still sit in the slots it was built with (cheap unless some user left its slots)."""
        if rows != self.meta.batch_size:
            raise ValueError(f"batch handle was built for {self.meta.batch_size} rows, the input has {rows}")
        eng = self.engine
        if eng.version != self._version:
            for u, tok in self._residency.items():
                if eng.residency.get(u) != tok:
                    raise StaleBatchError(f"batch handle is stale: user {u!r} was removed, replaced or evicted "
                                          f"after Engine.batch() built it; build a new handle")
            self._version = eng.version

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

    def prefix_delta(self, stack: str, prompt_width: int = 0, length: int = 0):
        """Shift of relative positions per row (B,), or per row and key column (B, P + length) when prompt
        tuning widened the encoder input (now `length` long) by `prompt_width` columns: a row's own prefix length for AdapterHub users,
        else 0. A row gets only its own prompt; the rest of the width is masked padding that must not move
        its prefix columns relative to its queries (alone, that padding does not exist)."""
        s, n = self._prefix_rows(stack)
        ah = self.banks["prefix"].ah[s.clamp(min=0)] & (s >= 0)
        if not bool(ah.any()):
            return None
        delta = torch.where(ah, n, 0)
        if not prompt_width:
            return delta
        P = self.prefix_len(stack)
        pad = torch.full_like(delta, prompt_width)
        if self.meta.has("prompt"):
            ps = self.meta.slots["prompt"]
            pad = pad - torch.where(ps >= 0, self.banks["prompt"].lengths[ps.clamp(min=0)], 0)
        cols = torch.arange(P + length, device=delta.device) < P
        return delta[:, None] + torch.where(ah, pad, 0)[:, None] * cols[None, :]

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
