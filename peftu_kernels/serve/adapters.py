"""The adapter store: a folder of users' adapters, read on demand into the engine's residency.

- the folder: HF PEFT, AdapterHub or peftu user folders, each read as one snapshot (tenancy.sources.read_snapshot:
  one descriptor, no symlinks, a folder changing while read is read again or refused). One id maps to one
  folder and one folder to one id: id `u` names the child `ids.folder_name(u)` if there is one, else the child
  named `u` itself, unless that name is the encoding of another id (the folder `%5aed` belongs to `Zed`, never
  to `%5aed`). Symlinked folders, names that are not one path component or too long for a file name never
  resolve.
- every tier after that (device slots, host memory, the engine's disk tier) and the one LRU policy over them
  belong to the engine's Residency; this store only sets its host capacity and registers what it read as
  `reloadable` (with no disk tier, a user pushed out of host memory is forgotten and read again on demand).

Reads run on a thread pool: `want(user)` starts one and returns at once, `poll()` (called by the step loop
between steps) registers what finished. So a step never waits on the disk.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ..tenancy import Engine, UserModule
from ..tenancy.ids import folder_name, user_of
from ..tenancy.sources import read_snapshot
from .usage import Hist


class AdapterStore:
    def __init__(self, engine: Engine, folder=None, host_capacity: int | None = None, workers: int = 2,
                 max_adapter_bytes: int = 1 << 30):
        engine.residency.set_host_capacity(host_capacity)  # refuses a host tier smaller than the device tier
        self.engine, self.host_capacity = engine, host_capacity
        self.root = Path(folder).resolve() if folder else None
        self.max_adapter_bytes = max_adapter_bytes
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adapter-load")
        self._loading: dict[str, Future] = {}
        self._staged: dict[str, list[UserModule]] = {}  # read, waiting for host memory
        self._lock = threading.Lock()
        self.failed: dict[str, str] = {}  # user -> why its last load failed (until asked again)
        self.stats = {"loads": 0, "load_errors": 0, "host_evictions": 0, "hits": 0, "misses": 0}
        self.load_seconds = Hist()  # from the read's start to the user registered (folder loads)
        self._started: dict[str, float] = {}
        self.check = None  # callable(user, modules): raises ValueError for an adapter the server cannot take

    # --- where users live ----------------------------------------------------------------------------
    def path(self, user: str) -> Path | None:
        """The user's folder on disk, or None (see the module doc: one id, one folder)."""
        if self.root is None or not isinstance(user, str) or not user:
            return None
        try:
            encoded = folder_name(user)
        except ValueError:  # not valid Unicode
            return None
        for name in dict.fromkeys((encoded, user)):
            if name in (".", "..") or "/" in name or "\\" in name or "\x00" in name or len(name.encode()) > 255:
                continue
            if name == user and user_of(name) not in (None, user):
                continue  # the encoding of another id: that id's folder
            p = self.root / name
            if p.is_dir() and not p.is_symlink():
                return p
        return None

    def _public(self, msg: str) -> str:
        """A failure as clients may read it: no server path (the adapters folder is named, not its location)."""
        return msg if self.root is None else msg.replace(f"{self.root}/", "").replace(str(self.root), "adapters")

    def known(self, user: str) -> bool:
        return self.engine.has(user) or self.path(user) is not None

    def on_disk(self) -> list[str]:
        """Ids of the user folders in the store: each folder's one id (the id its name encodes, else its name)."""
        if self.root is None:
            return []
        out = []
        for p in self.root.iterdir():
            uid = user_of(p.name) or p.name
            if self.path(uid) == p:
                out.append(uid)
        return sorted(out)

    # --- loading -------------------------------------------------------------------------------------
    def loading(self, user: str) -> bool:
        return user in self._loading or user in self._staged

    def want(self, user: str, reload: bool = False, pinned: set | None = None) -> bool:
        """Start reading `user` off this thread: its folder (new users, or reload=True), or the engine's disk
        tier (registered users pushed out of host memory). A no-op when it is in memory or on its way, or when
        host memory has no room (the step loop asks again). True when the user is loaded or on its way."""
        eng = self.engine
        with self._lock:
            if (eng.in_memory(user) and not reload) or self.loading(user):
                return True
            if eng.has(user) and not reload:  # on the engine's disk tier
                self._loading[user] = self._pool.submit(eng.residency.fill, user)
                return True
            path = self.path(user)
            if not reload and user in self.failed:  # retried only when asked (POST /v1/adapters/{user})
                return False
            room = eng.residency.room(pinned if pinned is not None else set())
            busy = len(self._loading) + len(self._staged)
            if path is None or (not reload and room is not None and room <= busy):
                return False
            self.failed.pop(user, None)
            self._started[user] = time.perf_counter()
            self._loading[user] = self._pool.submit(read_snapshot, self.root, path.name, eng.model,
                                                    max_bytes=self.max_adapter_bytes)
            return True

    def poll(self, pinned: set, wanted: list[str] = ()) -> list[str]:
        """On the step loop's thread: register finished reads (the residency makes room, never moving `pinned`
        users -- in flight -- out of memory), and start reads for `wanted` users. Returns the users
        registered."""
        done = []
        with self._lock:
            for u, f in [(u, f) for u, f in self._loading.items() if f.done()]:
                del self._loading[u]
                try:
                    got = f.result()
                except Exception as e:  # a bad folder fails its own requests only
                    self.failed[u] = self._public(f"{type(e).__name__}: {e}")
                    self.stats["load_errors"] += 1
                    continue
                if isinstance(got, list):
                    self._staged[u] = got
        for u in list(self._staged):
            mods = self._staged[u]
            try:
                if self.check is not None:
                    self.check(u, mods)
                self.engine.register(u, mods, replace=self.engine.has(u), reloadable=True, keep=pinned)
            except RuntimeError:  # host memory full of users in flight: try again after the next step
                continue
            except (ValueError, TypeError) as e:
                self.failed[u] = self._public(f"{type(e).__name__}: {e}")
                self.stats["load_errors"] += 1
            else:
                self.stats["loads"] += 1
                if u in self._started:
                    self.load_seconds.observe(time.perf_counter() - self._started.pop(u))
                done.append(u)
            del self._staged[u]
        for u in wanted:
            self.want(u, pinned=pinned)
        self.stats["host_evictions"] = self.engine.residency.stats["host_evictions"]
        return done

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
