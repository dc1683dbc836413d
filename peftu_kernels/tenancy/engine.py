"""The multi-tenant engine: a registry of users, a bank per method, and the per-batch hooks the model calls.

    eng = Engine(model)
    eng.register("alice", lora_module); eng.register("bob", [ia3_module])
    peft = eng.batch(["alice", "bob", None])          # BatchMeta computed once
    logits = model(input_ids, decoder_ids, mask, peft=peft)
"""
from __future__ import annotations

import secrets
import shutil
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import ops
from ..t5 import T5
from . import methods
from .ids import check_id
from .meta import BatchMeta
from .methods import Bank, TrainView
from .modules import UserModule, owned
from .residency import Residency
from .store import save_user


class StaleBatchError(RuntimeError):
    """A batch handle whose users' slots changed after it was built (removed, replaced or evicted)."""


class Engine:
    """Thread-safe: any number of threads may register / remove / batch and serve handles (greedy,
    score_labels, the model's entry points) on one engine. Each registry operation and each forward runs under
    the residency's lock, so it takes effect at one instant (docs/tenancy.md)."""

    def __init__(self, model: T5, backend: str | None = None, capacity: int | None = None, offload_dir=None,
                 dtype: torch.dtype | None = None, host_capacity: int | None = None):
        """capacity: most users resident in the banks (device tier); host_capacity: most users in CPU memory
        (default: unbounded, or `capacity` with a disk tier); beyond them the least recently used users are
        evicted to host memory, then to `offload_dir` on disk, and read back on demand. dtype: the banks'
        (default the model's); training keeps float32 banks under a 16-bit base so that small updates are not
        rounded away. The engine writes its offloaded users to a folder of its own under `offload_dir`
        (removed by `close()` or when the engine is collected), so engines sharing it never read each other's."""
        self.model = model
        p = next(model.parameters())
        self.device, self.dtype = p.device, dtype or p.dtype
        self.backend = ops.resolve(backend, self.device.type)
        root = Path(offload_dir) / f"engine-{secrets.token_hex(6)}" if offload_dir is not None else None
        self.residency = Residency(model, self.device, self.dtype, capacity, host_capacity, root)
        if root is not None:
            self._cleanup = weakref.finalize(self, shutil.rmtree, root, True)

    @property
    def lock(self):
        """The residency's re-entrant lock: hold it to make several calls one atomic step (batch + greedy)."""
        return self.residency.lock

    @property
    def capacity(self) -> int | None:
        return self.residency.capacity

    @property
    def store(self):
        return self.residency.store

    @property
    def banks(self) -> dict[str, Bank]:
        return self.residency.banks

    @property
    def offload_dir(self) -> Path | None:
        return self.store.root if self.store is not None else None

    @property
    def users(self) -> dict[str, str]:
        """A snapshot: registered user -> tier ("device", "host" or "disk"), least recently used first."""
        return self.residency.tiers()

    @property
    def slots(self) -> dict[str, dict[str, int]]:
        """A snapshot: user on the device -> bank key -> slot."""
        return self.residency.device_slots()

    def has(self, user: str) -> bool:
        return self.residency.has(user)

    def in_memory(self, user: str) -> bool:
        """Registered and on the device or in host memory: a batch of it reads no disk."""
        return self.residency.tier(user) in ("device", "host")

    def version(self, user: str) -> int | None:
        """The registered version of `user` (new on every register / replace), None when unknown."""
        return self.residency.version(user)

    def needs(self, user: str) -> dict[str, int]:
        """What serving `user` costs beyond weights (Method.needs of its modules, summed): virtual_tokens,
        prefix."""
        return self.residency.needs(user)

    def close(self) -> None:
        """Remove this engine's offload folder (its users stay registered only while in memory)."""
        if self.store is not None:
            self._cleanup()

    # --- registry ----------------------------------------------------------------------------------
    def register(self, user: str, modules, replace: bool = False, *, reloadable: bool = False,
                 keep: set = frozenset()) -> int:
        """Add (or with replace=True, swap) a user's modules; returns the new version. The engine keeps its own
        copies (detached, on the host): what the caller does with its tensors afterwards never reaches a served
        row. All or nothing: on any error the registry, the banks and the files are as they were.
        reloadable: the caller can register this user again from its own source (the server's adapter
        folders), so without a disk tier it may be forgotten when host memory is full. keep: users that must
        stay in host memory while this one makes room (a server's users in flight)."""
        user = check_id(user)
        modules = self._checked(user, modules)
        return self.residency.put(user, modules, replace, reloadable, keep)

    def _checked(self, user: str, modules) -> list[UserModule]:
        if isinstance(modules, UserModule):
            modules = [modules]
        if not isinstance(modules, (list, tuple)) or not all(isinstance(m, UserModule) for m in modules):
            raise TypeError(f"user {user!r}: modules must be a UserModule or a list of them, got "
                            f"{type(modules).__name__}")
        if not modules:
            raise ValueError(f"user {user!r}: no modules given (a user needs at least one)")
        modules = [owned(m, where=f"user {user!r} {m.method} module") for m in modules]
        for m in modules:  # the copies are checked: the caller cannot change them after the check
            methods.validate(m, self.model, where=f"user {user!r} {m.method} module")
        keys = [methods.get(m.method).bank_key(m) for m in modules]
        if len(set(keys)) != len(keys):
            raise ValueError(f"user {user!r}: two modules for the same bank {keys}")
        return modules

    def remove(self, user: str) -> None:
        self.residency.drop(user)

    def modules(self, user: str) -> list[UserModule]:
        """Copies of the user's modules (changing them changes nothing here)."""
        return [owned(m) for m in self.residency.held(user)]

    # --- batches -----------------------------------------------------------------------------------
    def batch(self, users: list[str | None]) -> "PeftBatch":
        """Per-row users (None = base model). First the batch's users are made resident (the residency's work:
        evictions, reads from disk); then the batch is planned (BatchMeta, each bank's plan), which reads the
        banks and changes nothing. The handle pins each user's residency and version: it serves exactly those
        or raises StaleBatchError."""
        if isinstance(users, str) or not isinstance(users, (list, tuple)):
            raise TypeError(f"Engine.batch takes a list of user ids (None = base model), got {type(users).__name__}")
        if not users:
            raise ValueError("Engine.batch: the batch has no rows")
        for i, u in enumerate(users):
            if u is not None:
                check_id(u, f"row {i}'s user id")
        with self.lock:
            pinned = self.residency.pin([u for u in users if u is not None])
            sizes = {k: b.slots for k, b in self.banks.items()}
            meta = BatchMeta.build([pinned[u][0] if u is not None else {} for u in users], self.device, sizes)
            return PeftBatch(self, meta, list(users), {u: (tok, ver) for u, (_, tok, ver) in pinned.items()})

    # --- reports -----------------------------------------------------------------------------------
    def memory_report(self) -> dict:
        with self.lock:
            tiers = self.residency.tiers()
            per_user, floor = {}, 0
            for u, tier in tiers.items():
                mods = self.residency.held(u)
                per_user[u] = {m.method: {"params": methods.get(m.method).served(m),
                                          "bytes": methods.get(m.method).served(m) * self.dtype.itemsize}
                               for m in mods}
                if tier == "device":
                    floor += sum(v["bytes"] for v in per_user[u].values())
            banks = {k: b.nbytes() for k, b in self.banks.items()}
            counts = self.residency.counts()
        return {"users": per_user, "banks": banks, "bank_bytes": sum(banks.values()), "resident_floor_bytes": floor,
                "resident_users": counts["device"], "registered_users": counts["registered"],
                "host_users": counts["host"], "disk_users": counts["disk"]}

    def save(self, user: str, folder) -> None:
        save_user(folder, self.residency.held(user), user)

    # --- training ----------------------------------------------------------------------------------
    def train_view(self, users: list[str]) -> TrainView:
        """The one bank that `users` (resident, one module each, all of one method) train in: its parameters,
        each user's slot, reads of their current modules (see methods.base.TrainView). The trainer's fast
        path: it changes the bank in place, so nothing else may change these users while it trains, and
        nothing here evicts (no capacity, or capacity >= users)."""
        with self.lock:
            slots, mods = self.residency.device_slots(), {}
            for u in users:
                held = self.residency.held(u)
                if u not in slots:
                    raise RuntimeError(f"train_view: user {u!r} is not resident (capacity {self.capacity})")
                if len(held) != 1:
                    raise ValueError(f"train_view: user {u!r} has {len(held)} modules; training takes one each")
                mods[u] = held[0]
            kinds = {m.method for m in mods.values()}
            if len(kinds) != 1:
                raise ValueError(f"train_view: users of one method per call (they share one bank), got {sorted(kinds)}")
            method = methods.get(kinds.pop())
            keys = {method.bank_key(m) for m in mods.values()}
            if len(keys) != 1:
                raise ValueError(f"train_view: the users' modules sit in different banks {sorted(keys)}")
            key = keys.pop()
            return method.train_view(self.banks[key], {u: slots[u][key] for u in users}, mods)


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

    def __init__(self, engine: Engine, meta: BatchMeta, rows: list[str | None], pinned: dict[str, tuple[int, int]]):
        """Built by Engine.batch under the residency's lock; planning reads the banks and changes nothing."""
        self.engine, self.meta, self.rows = engine, meta, rows
        self._pinned, self._changes = pinned, engine.residency.changes
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

    @property
    def versions(self) -> dict[str, int]:
        """user -> the version this handle serves (Engine.version at the time it was built)."""
        return {u: ver for u, (_, ver) in self._pinned.items()}

    @contextmanager
    def hold(self, rows: int):
        """What the model's entry points run under: the engine's lock (no registry change can interleave with
        the forward, and no other forward with this handle's scratch), after `check`."""
        with self.engine.lock:
            self.check(rows)
            yield self

    def check(self, rows: int) -> None:
        """The input must have this handle's rows, and every user of the handle must still sit in the slots it
        was built with (a counter compare unless some user left its slots). Call with the lock held."""
        if rows != self.meta.batch_size:
            raise ValueError(f"batch handle was built for {self.meta.batch_size} rows, the input has {rows}")
        res = self.engine.residency
        if res.changes != self._changes:
            for u, (tok, _) in self._pinned.items():
                if res.token(u) != tok:
                    raise StaleBatchError(f"batch handle is stale: user {u!r} was removed, replaced or evicted "
                                          f"after Engine.batch() built it; build a new handle")
            self._changes = res.changes

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
