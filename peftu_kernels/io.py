"""Atomic file writes and checked safetensors reads: a crash mid-save never leaves a broken file in place."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def atomic_write(path, write) -> None:
    """Call `write(tmp_path)`, fsync, then rename over `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fsync_dir(folder) -> None:
    """Make a rename or unlink in `folder` durable (the directory entry, not only the file, must reach disk)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_tensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_json(path, obj) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
    atomic_write(path, w)


def load_tensors(path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing, truncated or corrupt file raises ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weight file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


def load_weights(folder, safetensors_name: str, bin_name: str) -> dict[str, torch.Tensor]:
    """A folder's weights from its safetensors file, else its pickle (read with weights_only=True)."""
    folder = Path(folder)
    st, bn = folder / safetensors_name, folder / bin_name
    if st.is_file():
        return load_tensors(st)
    if bn.is_file():
        try:
            w = torch.load(bn, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{bn}: unreadable ({e})") from e
        if not isinstance(w, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in w.items()):
            raise ValueError(f"{bn}: holds a {type(w).__name__}, not a dict of named tensors")
        return w
    raise FileNotFoundError(f"{folder}: no {safetensors_name} or {bin_name}")


def load_json_object(path) -> dict:
    """A JSON file that must hold an object (a config): anything else is refused naming the file."""
    obj = load_json(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: must hold a JSON object, got a {type(obj).__name__}")
    return obj


def load_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
