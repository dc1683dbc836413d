"""Save and load a user's modules: one safetensors file per method (config in its metadata), written atomically."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from ..io import load_tensors, save_tensors
from .modules import METHODS, UserModule


def save_user(folder, modules: list[UserModule]) -> None:
    folder = Path(folder)
    for m in modules:
        save_tensors(folder / f"{m.method}.safetensors", m.tensors,
                     {"method": m.method, "config": json.dumps(m.config), "format": "peftu-1"})


def load_module(path) -> UserModule:
    path = Path(path)
    tensors = load_tensors(path)  # names the file if missing or corrupt
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "peftu-1" or meta.get("method") not in METHODS:
        raise ValueError(f"{path}: not a peftu module file (metadata {meta})")
    try:
        config = json.loads(meta.get("config", "{}"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: bad config metadata ({e})") from e
    return UserModule(meta["method"], tensors, config)


def load_user(folder) -> list[UserModule]:
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no module files (*.safetensors)")
    return [load_module(f) for f in files]
