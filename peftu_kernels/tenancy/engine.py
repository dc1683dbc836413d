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
from . import methods
from .ids import check_id
from .meta import BatchMeta
from .methods import Bank, TrainView
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
        for m in modules:
            validate(m, self.model, where=f"user {user!r} {m.method} module")
        keys = [m.bank for m in modules]
        if len(set(keys)) != len(keys):
            raise ValueError(f"user {user!r}: two modules for the same bank {keys}")
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
                    bank = self.banks[m.bank] = methods.get(m.method).new_bank(m.bank, self.model, self.device,
                                                                               self.dtype)
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

    # --- training ----------------------------------------------------------------------------------
    def train_view(self, users: list[str]) -> TrainView:
        """The one bank that `users` (resident, one module each, all of one method) train in: its parameters,
        each user's slot, reads of their current modules (see methods.base.TrainView). Nothing here evicts:
        the caller keeps every user resident while it trains (no capacity, or capacity >= users)."""
        mods = {}
        for u in users:
            self._known(u)
            if u not in self.slots:
                raise RuntimeError(f"train_view: user {u!r} is not resident (capacity {self.capacity})")
            if len(self.users[u]) != 1:
                raise ValueError(f"train_view: user {u!r} has {len(self.users[u])} modules; training takes one each")
            mods[u] = self.users[u][0]
        kinds = {m.method for m in mods.values()}
        if len(kinds) != 1:
            raise ValueError(f"train_view: users of one method per call (they share one bank), got {sorted(kinds)}")
        first = next(iter(mods.values()))
        keys = {m.bank for m in mods.values()}
        if len(keys) != 1:
            raise ValueError(f"train_view: the users' modules sit in different banks {sorted(keys)}")
        key = keys.pop()
        return methods.get(first.method).train_view(self.banks[key], {u: self.slots[u][key] for u in users}, mods)


class _Ops(dict):
    def __init__(self, backend):
        super().__init__()
        self.backend = backend

    def __missing__(self, name):
        fn = self[name] = ops.get(name, self.backend)
        return fn


class PeftBatch:
    """The hooks our T5 calls. Everything that depends only on who is in the batch (slots, segments, active
    rows, prompt and prefix widths, masks and position shifts) is planned here once, on the host where cheap,
    and moved to the device once: a generated token reuses it and makes no host sync."""

    def __init__(self, engine: Engine, meta: BatchMeta, residency: dict[str, int]):
        self.engine, self.meta = engine, meta
        self._residency, self._version = residency, engine.version
        self.op = _Ops(engine.backend)
        banks = sorted((engine.banks[k] for k in meta.slots), key=lambda b: (b.order, b.key))
        hooked = lambda h: [b for b in banks if h in b.hooks]  # noqa: E731
        self._in, self._out, self._res = hooked("linear_in"), hooked("linear_out"), hooked("residual")
        self._prompt = next(iter(hooked("prompt")), None)
        self._prefix = next(iter(hooked("prefix")), None)
        self.plans = {}
        for b in banks:
            self.plans[b.key] = b.plan(self)
        self.scratch: dict = {}  # a group's outputs computed with its first site, for the others (q -> k, v)

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
        done = self.scratch.get("group")
        if done is not None and done[0] is x and site in done[1]:  # computed with its group's first site
            return done[1].pop(site)
        fusing = {b: b.fuses(site) for b in self._out if hasattr(b, "fuses")}
        group = next((g for g in fusing.values() if g), None)
        if group is None or site != group[0]:
            return self._linear(site, x, weight)
        # sites that share this input (q, k, v): their base outputs now, so that a bank can serve them together
        weights = {s: self.engine.model.get_submodule(s).weight for s in group}
        ys = {}
        for s in group:
            x_in = x
            for b in self._in:
                x_in = b.linear_in(self, s, x_in)
            ys[s] = F.linear(x_in, weights[s])
        for b in self._out:
            if fusing.get(b) == group:
                ys = b.linear_out_group(self, group, x, ys)
            else:
                ys = {s: b.linear_out(self, s, x, ys[s], weights[s]) for s in group}
        y = ys.pop(site)
        self.scratch["group"] = (x, ys)
        return y

    def _linear(self, site, x, weight):
        x_in = x
        for b in self._in:
            x_in = b.linear_in(self, site, x_in)
        y = F.linear(x_in, weight)
        for b in self._out:
            y = b.linear_out(self, site, x, y, weight)
        return y

    def residual(self, site: str, x, f):
        out = x + f
        for b in self._res:
            out = b.residual(self, site, f, out)
        return out

    def prompt(self, x, mask):
        return (x, mask) if self._prompt is None else self._prompt.prompt(self, x, mask)

    def prefix_len(self, stack: str) -> int:
        return 0 if self._prefix is None else self.plans[self._prefix.key][stack]["P"]

    def prefix_mask(self, stack: str):
        return self.plans[self._prefix.key][stack]["mask"]

    def prefix_delta(self, stack: str, prompt_width: int = 0, length: int = 0):
        """Shift of relative positions per row (B,), or per row and key column (B, P + length) when prompt
        tuning widened the encoder input (now `length` long) by `prompt_width` columns; None when no row
        needs one (only AdapterHub prefixes shift positions)."""
        rows = self.plans[self._prompt.key]["row_len"] if self._prompt is not None else None
        return self._prefix.prefix_delta(self, stack, prompt_width, length, rows)

    def prefix_kv(self, site: str, k, v):
        return (k, v) if self._prefix is None else self._prefix.prefix_kv(self, site, k, v)
