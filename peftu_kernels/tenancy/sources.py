"""Sources: a folder on disk turned into a user's modules, whatever wrote it -- HF PEFT (adapter_config.json with
peft_type), AdapterHub (adapter_config.json with config and name) or peftu (manifest.json, or module files from
before manifests) -- detected by its files. The server's adapter store reads users through this; what it read
is registered (and owned) by the engine's residency."""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from ..io import load_json_object
from .adapterhub import import_adapterhub
from .hf_peft import import_peft
from .modules import UserModule
from .store import MANIFEST, load_user


def read_folder(folder, model, user: str | None = None) -> list[UserModule]:
    """A user's modules from an HF PEFT, AdapterHub or peftu folder. `user`: a peftu folder must be this user's
    (its manifest and files, when they name one)."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file() or (not (folder / "adapter_config.json").is_file()
                                          and any(folder.glob("*.safetensors"))):
        return load_user(folder, user)
    cfg = load_json_object(folder / "adapter_config.json")
    if "peft_type" in cfg:
        return [import_peft(folder, model)]
    if "config" in cfg and "name" in cfg:
        return [import_adapterhub(folder, model)]
    raise ValueError(f"{folder}: neither an HF PEFT, an AdapterHub nor a peftu adapter folder")


def read_snapshot(root, name: str, model, user: str | None = None, max_bytes: int = 1 << 30,
                  tries: int = 3) -> list[UserModule]:
    """The user folder `root/name` read as one version, then parsed (read_folder). The folder is opened once
    (no symlink: a symlinked folder or file is refused, so nothing outside `root` is read), every regular file
    read through one descriptor into memory, and the folder checked afterwards (names, inodes, sizes, mtimes of
    every file, before and after each read): a folder changed meanwhile is read again, up to `tries` times, then
    refused. A folder replaced whole (an atomic directory exchange) is read as the one that was opened. Errors
    name the folder by `name`, never by a server path. Over `max_bytes` in all: refused."""
    for _ in range(tries):
        files = _read_once(Path(root), name, max_bytes)
        if files is not None:
            break
    else:
        raise ValueError(f"{name}: the folder kept changing while it was read ({tries} tries); try again")
    with tempfile.TemporaryDirectory(prefix="peftu-snapshot-") as tmp:
        for fname, data in files.items():
            (Path(tmp) / fname).write_bytes(data)
        try:
            return read_folder(tmp, model, user)
        except (ValueError, OSError, KeyError) as e:
            raise ValueError(str(e).replace(tmp, name)) from None


def _listing(dfd: int, name: str) -> dict[str, tuple]:
    out = {}
    with os.scandir(dfd) as it:
        for e in it:
            st = e.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise ValueError(f"{name}/{e.name}: a symlink; adapter files must be plain files in their folder")
            if stat.S_ISREG(st.st_mode):
                out[e.name] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def _read_once(root: Path, name: str, max_bytes: int) -> dict[str, bytes] | None:
    """Every regular file of root/name, or None when the folder changed while it was read."""
    rfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            dfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=rfd)
        except OSError as e:
            raise ValueError(f"{name}: not a plain folder in the adapters folder ({e.strerror})") from None
    finally:
        os.close(rfd)
    try:
        before = _listing(dfd, name)
        if sum(v[1] for v in before.values()) > max_bytes:
            raise ValueError(f"{name}: the folder holds more than {max_bytes} bytes (the server's limit)")
        data = {}
        for fname, sig in before.items():
            try:
                fd = os.open(fname, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
            except OSError:
                return None  # gone or replaced by something else since the listing
            try:
                if _sig(os.fstat(fd)) != sig:
                    return None
                chunks = []
                while chunk := os.read(fd, 1 << 20):
                    chunks.append(chunk)
                if _sig(os.fstat(fd)) != sig:
                    return None
            finally:
                os.close(fd)
            data[fname] = b"".join(chunks)
            if len(data[fname]) != sig[1]:
                return None
        return data if _listing(dfd, name) == before else None
    finally:
        os.close(dfd)


def _sig(st) -> tuple:
    return st.st_ino, st.st_size, st.st_mtime_ns
