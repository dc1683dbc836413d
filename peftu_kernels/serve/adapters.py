"""The adapter store: users' adapters loaded on demand, in three tiers.

- disk: a folder of user folders -- HF PEFT (adapter_config.json with peft_type), AdapterHub (adapter_config.json
  with config and name) or peftu (manifest.json); detected by their files. A user id names a direct child of
  the folder (or its `ids.folder_name`): ids that are not a plain child name never resolve to a path.
- host: the engine's registered users (their modules in CPU memory), at most `host_capacity`, LRU.
- device: the engine's bank slots, at most the engine's `capacity`, LRU (the engine evicts to host itself).

Disk reads run on a thread pool: `want(user)` starts one and returns at once, `poll()` (called by the step
loop between steps) registers what finished. So a step never waits on the disk.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ..tenancy import Engine, UserModule
from ..tenancy.adapterhub import import_adapterhub
from ..tenancy.hf_peft import import_peft
from ..tenancy.ids import folder_name
from ..tenancy.store import MANIFEST, load_user
from ..io import load_json_object


def read_folder(folder: Path, model) -> list[UserModule]:
    """A user's modules from an HF PEFT, AdapterHub or peftu folder, detected by its files."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file() or (not (folder / "adapter_config.json").is_file()
                                          and any(folder.glob("*.safetensors"))):
        return load_user(folder)
    cfg = load_json_object(folder / "adapter_config.json")
    if "peft_type" in cfg:
        return [import_peft(folder, model)]
    if "config" in cfg and "name" in cfg:
        return [import_adapterhub(folder, model)]
    raise ValueError(f"{folder}: neither an HF PEFT, an AdapterHub nor a peftu adapter folder")


class AdapterStore:
    def __init__(self, engine: Engine, folder=None, host_capacity: int | None = None, workers: int = 2):
        if host_capacity is not None and (engine.capacity or 1) > host_capacity:
            raise ValueError(f"host_capacity {host_capacity} is below the engine's device capacity {engine.capacity}")
        self.engine, self.host_capacity = engine, host_capacity
        self.root = Path(folder).resolve() if folder else None
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adapter-load")
        self._loading: dict[str, Future] = {}
        self._staged: dict[str, list[UserModule]] = {}  # read, waiting for host memory
        self._lock = threading.Lock()
        self.failed: dict[str, str] = {}  # user -> why its last load failed (until asked again)
        self.stats = {"loads": 0, "load_errors": 0, "host_evictions": 0, "hits": 0, "misses": 0}

    # --- where users live ----------------------------------------------------------------------------
    def path(self, user: str) -> Path | None:
        """The user's folder on disk, or None. Only direct children of the store's folder resolve."""
        if self.root is None:
            return None
        for name in (user, folder_name(user)):
            if name in (".", "..") or "/" in name or "\\" in name or "\x00" in name or not name:
                continue
            p = self.root / name
            if p.is_dir() and p.resolve().parent == self.root:
                return p
        return None

    def known(self, user: str) -> bool:
        return user in self.engine.users or self.path(user) is not None

    def on_disk(self) -> list[str]:
        """Ids of the user folders in the store (a folder's name is its user's id)."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root else []

    # --- loading -------------------------------------------------------------------------------------
    def loading(self, user: str) -> bool:
        return user in self._loading or user in self._staged

    def _room(self, pinned: set) -> bool:
        """Host memory for one more user: free capacity, or a user that may leave (not pinned, on disk)."""
        cap = self.host_capacity
        if cap is None or len(self.engine.users) + len(self._loading) + len(self._staged) < cap:
            return True
        return any(u not in pinned and self.path(u) is not None for u in self.engine.users)

    def want(self, user: str, reload: bool = False, pinned: set | None = None) -> bool:
        """Start loading `user` off this thread (a no-op if it is registered or on its way, or if host memory
        is full: the step loop asks again). True when the user is loaded or on its way."""
        with self._lock:
            if (user in self.engine.users and not reload) or self.loading(user):
                return True
            path = self.path(user)
            if not reload and user in self.failed:  # retried only when asked (POST /v1/adapters/{user})
                return False
            if path is None or (not reload and not self._room(pinned if pinned is not None else set(self.engine.users))):
                return False
            self.failed.pop(user, None)
            self._loading[user] = self._pool.submit(read_folder, path, self.engine.model)
            return True

    def poll(self, pinned: set, wanted: list[str] = ()) -> list[str]:
        """On the step loop's thread: register finished loads where host memory allows (evicting LRU users
        that are not `pinned` -- in flight -- and can be read back from disk), and start loads for `wanted`
        users while there is room. Returns the users registered."""
        done = []
        with self._lock:
            for u, f in [(u, f) for u, f in self._loading.items() if f.done()]:
                del self._loading[u]
                try:
                    self._staged[u] = f.result()
                except Exception as e:  # a bad folder fails its own requests only
                    self.failed[u] = f"{type(e).__name__}: {e}"
                    self.stats["load_errors"] += 1
        for u in list(self._staged):
            if not self._make_room(pinned | {u}, replacing=u in self.engine.users):
                continue
            mods = self._staged.pop(u)
            try:
                self.engine.register(u, mods, replace=u in self.engine.users)
            except (ValueError, TypeError) as e:
                self.failed[u] = f"{type(e).__name__}: {e}"
                self.stats["load_errors"] += 1
                continue
            self.stats["loads"] += 1
            done.append(u)
        for u in wanted:
            self.want(u, pinned=pinned)
        return done

    def _make_room(self, pinned: set, replacing: bool) -> bool:
        cap = self.host_capacity
        while cap is not None and not replacing and len(self.engine.users) >= cap:
            victim = next((u for u in self.engine.users if u not in pinned and self.path(u) is not None), None)
            if victim is None:
                return False
            self.engine.remove(victim)
            self.stats["host_evictions"] += 1
        return True

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
