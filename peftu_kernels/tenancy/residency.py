"""Residency: the one owner of every tier a user's modules can sit in, and of the registry itself.

    device  bank slots (one Bank per bank key), at most `capacity` users      -- what a batch reads
    host    the user's owned module list in CPU memory, at most `host_capacity` -- device users are here too
    disk    this engine's offload folder (a UserStore), unbounded              -- read back into host on demand

One eviction policy: least recently used (a user's use is its registration and every batch that names it).
A user leaves the device when another needs its slots, leaves host memory when host is over capacity: to the
disk tier when there is one; a user registered as `reloadable` (its folder can be read again, the server's
adapters) with no disk tier is forgotten instead, and is registered again, as a new version, on demand.

Concurrency: one re-entrant lock (`lock`) guards every field here and every bank tensor. Every registry
operation and every forward that reads the banks (PeftBatch.hold) runs under it, so each takes effect at one
instant. The only I/O outside it is `fill`'s read of a disk copy, whose result is installed only if the user's
version did not change meanwhile.

Versions: every registration (and replacement) of a user draws a new `version`; every write of a user into bank
slots draws a new residency `token`. A batch handle keeps both per user: tokens say whether its slots still hold
them, versions which module they hold.
"""
from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from pathlib import Path

from . import methods
from .methods import Bank
from .modules import UserModule
from .store import UserStore


class _Entry:
    __slots__ = ("version", "mods", "reloadable", "slots", "token", "on_disk", "needs")

    def __init__(self, version: int, mods: list[UserModule], reloadable: bool):
        self.version, self.mods, self.reloadable = version, mods, reloadable
        self.needs = methods.needs_of(mods)  # kept while the modules are on disk
        self.slots: dict[str, int] | None = None  # device tier: bank key -> slot
        self.token = 0                            # residency token while on the device
        self.on_disk = False                      # the disk tier holds this version

    @property
    def tier(self) -> str:
        return "device" if self.slots is not None else "host" if self.mods is not None else "disk"


class Residency:
    def __init__(self, model, device, dtype, capacity: int | None = None, host_capacity: int | None = None,
                 offload_root: Path | None = None):
        for name, v in (("capacity", capacity), ("host_capacity", host_capacity)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be a positive int (most users in that tier) or None, got {v!r}")
        self.model, self.device, self.dtype = model, device, dtype
        self.capacity = capacity
        self.store = UserStore(offload_root) if offload_root is not None else None
        # with a disk tier and no host bound, host holds what the device holds (what an offloading engine did)
        self.host_capacity = host_capacity if host_capacity is not None or self.store is None else capacity
        self._check_caps(self.host_capacity)
        self.lock = threading.RLock()
        self._users: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self.banks: dict[str, Bank] = {}
        self._free: dict[str, list[int]] = {}
        self._versions, self._tokens = itertools.count(1), itertools.count(1)
        self.changes = 0  # bumped whenever a user leaves its slots: handles re-check their users then
        self.stats = {"device_evictions": 0, "host_evictions": 0, "disk_reads": 0}

    def _check_caps(self, host_capacity):
        if host_capacity is not None and self.capacity is not None and host_capacity < self.capacity:
            raise ValueError(f"host_capacity {host_capacity} is below the device capacity {self.capacity} "
                             f"(every user on the device is in host memory too)")

    def set_host_capacity(self, n: int | None) -> None:
        with self.lock:
            if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
                raise ValueError(f"host_capacity must be a positive int or None, got {n!r}")
            self._check_caps(n)
            self.host_capacity = n

    # --- queries -----------------------------------------------------------------------------------
    def has(self, user: str) -> bool:
        return user in self._users

    def version(self, user: str) -> int | None:
        e = self._users.get(user)
        return e.version if e is not None else None

    def tier(self, user: str) -> str | None:
        e = self._users.get(user)
        return e.tier if e is not None else None

    def room(self, keep: set) -> int | None:
        """How many more users host memory can take now (moving others not in `keep` out); None: unbounded."""
        with self.lock:
            if self.host_capacity is None:
                return None
            in_host = [u for u, e in self._users.items() if e.mods is not None]
            movable = sum(1 for u in in_host if u not in keep and (self.store is not None or self._users[u].reloadable))
            return self.host_capacity - len(in_host) + movable

    def needs(self, user: str) -> dict[str, int]:
        return dict(self._get(user).needs)

    def tiers(self) -> dict[str, str]:
        """user -> tier, least recently used first (a snapshot)."""
        with self.lock:
            return {u: e.tier for u, e in self._users.items()}

    def device_slots(self) -> dict[str, dict[str, int]]:
        with self.lock:
            return {u: dict(e.slots) for u, e in self._users.items() if e.slots is not None}

    def counts(self) -> dict[str, int]:
        with self.lock:
            tiers = [e.tier for e in self._users.values()]
            return {"registered": len(tiers), "device": tiers.count("device"),
                    "host": len(tiers) - tiers.count("disk"), "disk": tiers.count("disk")}

    def held(self, user: str) -> list[UserModule]:
        """The user's modules as held (host, else read from disk). Callers must not change them."""
        with self.lock:
            e = self._get(user)
            if e.mods is not None:
                return e.mods
        return self._read_disk(user)

    def _get(self, user: str) -> _Entry:
        e = self._users.get(user)
        if e is None:
            raise KeyError(f"unknown user id {user!r} (registered: {len(self._users)} users)")
        return e

    # --- registry ------------------------------------------------------------------------------------
    def put(self, user: str, mods: list[UserModule], replace: bool = False, reloadable: bool = False,
            keep: set = frozenset()) -> int:
        """Register (or replace) `user` with `mods` (owned, validated) and write it into the device tier. All or
        nothing: on any error the registry, the banks and the files are as they were (other users may have
        moved between tiers, never changed). `keep`: users that must not leave host memory for this. Returns
        the new version."""
        with self.lock:
            old = self._users.get(user)
            if old is not None and not replace:
                raise ValueError(f"user {user!r} is already registered (pass replace=True to swap its modules)")
            if old is None or old.mods is None:
                self._host_room(set(keep) | {user}, extra=1)
            order = list(self._users)
            new = _Entry(next(self._versions), mods, reloadable)
            was_resident = old is not None and old.slots is not None
            try:
                self._release(user)  # a replaced set never serves again, even if what follows fails
                self._users[user] = new
                self._users.move_to_end(user)
                self._device_room({user})
                self._write(user, new)
            except BaseException:
                self._release(user)
                if old is None:
                    self._users.pop(user, None)
                else:
                    self._users[user] = old
                    if was_resident:  # its slots were freed above, so this needs no eviction
                        try:
                            self._write(user, old)
                        except Exception:
                            pass  # still registered, in host memory: reloaded into slots on its next batch
                self._users = OrderedDict((u, self._users[u]) for u in order if u in self._users)
                raise
            if old is not None and old.on_disk:
                self.store.remove(user)  # the replaced version's disk copy
            return new.version

    def drop(self, user: str) -> None:
        with self.lock:
            e = self._get(user)
            if e.on_disk:
                self.store.remove(user)  # raises before anything else changes if the disk refuses
            self._release(user)
            del self._users[user]

    # --- tiers ---------------------------------------------------------------------------------------
    def pin(self, users: list[str]) -> dict[str, tuple[dict[str, int], int, int]]:
        """Make every user in `users` resident on the device (reading host-evicted ones from disk, evicting the
        least recently used others); returns user -> (slots, token, version). Call with the lock held."""
        distinct = list(dict.fromkeys(users))
        for u in distinct:
            self._get(u)
        if self.capacity is not None and len(distinct) > self.capacity:
            raise RuntimeError(f"bank capacity {self.capacity} is smaller than the batch's {len(distinct)} "
                               f"distinct users")
        for u in distinct:
            self._users.move_to_end(u)
        for u in distinct:
            e = self._users[u]
            if e.slots is None:
                if e.mods is None:
                    mods = self._read_disk(u)
                    self._host_room(set(distinct), extra=1)
                    e.mods = mods
                self._device_room(set(distinct))
                self._write(u, e)
        return {u: (self._users[u].slots, self._users[u].token, self._users[u].version) for u in distinct}

    def fill(self, user: str) -> bool:
        """Bring a disk-tier user back into host memory, reading the disk outside the lock (the server's
        prefetch, off its step thread). False when there was no room or the user changed meanwhile."""
        with self.lock:
            e = self._users.get(user)
            if e is None or e.mods is not None:
                return e is not None
            version = e.version
        mods = self._read_disk(user)
        with self.lock:
            e = self._users.get(user)
            if e is None or e.version != version:
                return False
            if e.mods is None:
                try:
                    self._host_room({user}, extra=1)
                except RuntimeError:
                    return False
                e.mods = mods
            return True

    def _read_disk(self, user: str) -> list[UserModule]:
        if self.store is None:
            raise RuntimeError(f"user {user!r} is on no tier (no disk tier)")
        self.stats["disk_reads"] += 1
        return self.store.load(user)

    def _host_room(self, keep: set, extra: int) -> None:
        """Make room in host memory for `extra` more users, moving the least recently used others (not in
        `keep`; off the device first if they are on it) to disk, or forgetting reloadable ones when there is
        no disk tier."""
        cap = self.host_capacity
        if cap is None:
            return
        in_host = [u for u, e in self._users.items() if e.mods is not None]
        need = len(in_host) + extra - cap
        for u in in_host:
            if need <= 0:
                return
            e = self._users[u]
            if u in keep or (self.store is None and not e.reloadable):
                continue
            if self.store is not None and not e.on_disk:
                self.store.save(u, e.mods)  # saved before its slots are freed: a failed save changes nothing
                e.on_disk = True
            self._release(u)
            self.stats["host_evictions"] += 1
            if self.store is not None:
                e.mods = None
            else:
                del self._users[u]
            need -= 1
        if need > 0:
            raise RuntimeError(f"host memory holds its capacity of {cap} users and none of them can leave it "
                               f"(no disk tier, or every one is in use)")

    def _device_room(self, keep: set) -> None:
        if self.capacity is None:
            return
        resident = [u for u, e in self._users.items() if e.slots is not None]
        if len(resident) < self.capacity:
            return
        victim = next((u for u in resident if u not in keep), None)
        if victim is None:
            raise RuntimeError(f"bank capacity {self.capacity} is smaller than the batch's distinct users")
        self._release(victim)  # its modules stay in host memory
        self.stats["device_evictions"] += 1

    def _write(self, user: str, e: _Entry) -> None:
        e.slots = {}
        try:
            for m in e.mods:
                method = methods.get(m.method)
                key = method.bank_key(m)
                bank = self.banks.get(key)
                if bank is None:
                    bank = self.banks[key] = method.new_bank(key, self.model, self.device, self.dtype)
                    self._free[key] = []
                if not self._free[key]:
                    n = bank.slots
                    bank.grow(n + 1, self.capacity)
                    self._free[key] = list(range(bank.slots - 1, n - 1, -1))
                slot = self._free[key].pop()
                e.slots[key] = slot
                bank.write(slot, m)
        except BaseException:
            self._release(user)
            raise
        e.token = next(self._tokens)

    def _release(self, user: str) -> None:
        """Free the user's slots (cleared, so no later batch can read its weights there)."""
        e = self._users.get(user)
        if e is None or e.slots is None:
            return
        self.changes += 1
        slots, e.slots, e.token = e.slots, None, 0
        for key, slot in slots.items():
            self.banks[key].clear(slot)
            self._free[key].append(slot)

    def token(self, user: str) -> int:
        e = self._users.get(user)
        return e.token if e is not None else 0
