"""Save and load a user's modules as one set: all methods or none, whatever crashes when.

A user folder holds one safetensors file per method (config in its metadata) and `manifest.json`, which
names the files of the current set and the user id. A save writes new files under fresh names, fsyncs
them, then replaces the manifest with one atomic rename (the commit point) and fsyncs the folder; only
then are files of earlier sets and orphaned temporaries removed. A load reads only what the manifest names,
so a stale file of another method, or a half-written set, is never loaded back as part of the user.
Folders written before manifests existed (one `<method>.safetensors` each) are still read.

`UserStore` maps user ids to folders under one root (`ids.folder_name`), so no id reaches outside it.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path

from safetensors import safe_open

from ..io import fsync_dir, load_json, load_tensors, save_json, save_tensors
from .ids import check_id, folder_name, user_of
from . import methods
from .modules import UserModule

FORMAT = "peftu-user-1"
MANIFEST = "manifest.json"


def _ours() -> re.Pattern:
    """File names a save may delete: earlier sets of a registered method's files and orphaned temporaries."""
    m = "(?:" + "|".join(map(re.escape, methods.names())) + ")"
    return re.compile(rf"^(?:{m}(?:\.[0-9a-f]{{8}})?\.safetensors|\.(?:{m}|manifest)\..*\.tmp)$")


def save_user(folder, modules: list[UserModule], user: str | None = None) -> None:
    """Write `modules` as the folder's new set (atomically, see the module doc). `user` is recorded."""
    folder = Path(folder)
    kinds = [m.method for m in modules]
    if not modules or len(set(kinds)) != len(kinds):
        raise ValueError(f"{folder}: a user's set needs one module per method, got {kinds}")
    folder.mkdir(parents=True, exist_ok=True)
    tag, written = secrets.token_hex(4), []
    try:
        files = {}
        for m in modules:
            name = f"{m.method}.{tag}.safetensors"
            written.append(folder / name)
            meta = {"method": m.method, "config": json.dumps(m.config), "format": "peftu-1"}
            if user is not None:
                meta["user"] = user  # each file says whose it is: a manifest edited by hand cannot lend it
            save_tensors(folder / name, m.tensors, meta)
            files[m.method] = name
        save_json(folder / MANIFEST, {"format": FORMAT, "user": user, "files": files})  # the commit point
    except BaseException:
        for f in written:
            f.unlink(missing_ok=True)
        raise
    _clean(folder, keep=set(files.values()))


def _clean(folder: Path, keep: set[str]) -> None:
    """Remove earlier sets' files and orphaned temporaries; never anything a save could not have written."""
    removed, ours = False, _ours()
    for f in folder.iterdir():
        if f.name not in keep and f.name != MANIFEST and ours.match(f.name) and f.is_file():
            f.unlink(missing_ok=True)
            removed = True
    if removed:
        fsync_dir(folder)


def load_module(path, user: str | None = None) -> UserModule:
    """A module file; with `user`, a file that names another user is refused (files from before users were
    recorded in them name none)."""
    path = Path(path)
    tensors = load_tensors(path)  # names the file if missing or corrupt
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "peftu-1" or meta.get("method") not in methods.names():
        raise ValueError(f"{path}: not a peftu module file (metadata {meta})")
    owner = meta.get("user")
    if user is not None and owner is not None and owner != user:
        raise ValueError(f"{path}: belongs to user {owner!r}, not {user!r} (refused)")
    try:
        config = json.loads(meta.get("config", "{}"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: bad config metadata ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path}: config metadata must be a JSON object, got {type(config).__name__}")
    return UserModule(meta["method"], tensors, config)


def read_manifest(folder) -> dict | None:
    """The folder's manifest, checked; None for a folder from before manifests."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    man = load_json(path)
    files = man.get("files") if isinstance(man, dict) else None
    if not isinstance(man, dict) or man.get("format") != FORMAT or not isinstance(files, dict) or not files:
        raise ValueError(f"{path}: not a peftu user manifest (format {FORMAT!r} with a non-empty 'files' map)")
    ours = _ours()
    for method, name in files.items():
        if method not in methods.names() or not isinstance(name, str) or not ours.match(name) or name.startswith("."):
            raise ValueError(f"{path}: bad entry {method!r}: {name!r}")
    return man


def load_user(folder, user: str | None = None) -> list[UserModule]:
    """The folder's set. With `user` (or a user named in the manifest), the manifest and every file must name
    that user: a manifest or file edited, corrupted or copied from another folder never loads as this one."""
    folder = Path(folder)
    man = read_manifest(folder)
    if man is not None:
        owner = man.get("user")
        if owner is not None and not isinstance(owner, str):
            raise ValueError(f"{folder / MANIFEST}: 'user' must be a string, got {owner!r}")
        if user is not None and owner is not None and owner != user:
            raise ValueError(f"{folder / MANIFEST}: holds user {owner!r}, not {user!r}")
        user = user if user is not None else owner
    if man is None:  # written before manifests: every module file in the folder
        files = sorted(f for f in folder.glob("*.safetensors") if f.stem in methods.names())
        if not files:
            raise FileNotFoundError(f"{folder}: no {MANIFEST} and no module files (*.safetensors)")
        return [load_module(f, user) for f in files]
    out = []
    for method, name in sorted(man["files"].items()):
        m = load_module(folder / name, user)
        if m.method != method:
            raise ValueError(f"{folder / name}: holds a {m.method} module, the manifest says {method}")
        out.append(m)
    return out


class UserStore:
    """Users' sets under one root folder, one sub-folder per user id (any string is a safe id)."""

    def __init__(self, root):
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe.{secrets.token_hex(4)}.tmp"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ValueError(f"store folder {self.root} is not a writable folder ({e})") from e

    def path(self, user: str) -> Path:
        return self.root / folder_name(check_id(user))

    def save(self, user: str, modules: list[UserModule]) -> None:
        save_user(self.path(user), modules, user)

    def load(self, user: str) -> list[UserModule]:
        return load_user(self.path(user), user)

    def has(self, user: str) -> bool:
        return (self.path(user) / MANIFEST).is_file()

    def remove(self, user: str) -> None:
        """Delete the user's set: the manifest first (after that the set is gone), then its files."""
        p = self.path(user)
        if (p / MANIFEST).exists():
            os.unlink(p / MANIFEST)
            fsync_dir(p)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)

    def users(self) -> list[str]:
        """Ids of the users stored here (from folder names, or the manifest for hashed names)."""
        out = []
        for d in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if not (d / MANIFEST).is_file():
                continue
            u = user_of(d.name)
            if u is None:
                u = (read_manifest(d) or {}).get("user")
            if isinstance(u, str) and folder_name(u) == d.name:
                out.append(u)
        return out
