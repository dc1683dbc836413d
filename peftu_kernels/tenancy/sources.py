"""Sources: a folder on disk turned into a user's modules, whatever wrote it -- HF PEFT (adapter_config.json with
peft_type), AdapterHub (adapter_config.json with config and name) or peftu (manifest.json, or module files from
before manifests) -- detected by its files. The server's adapter store reads users through this; what it read
is registered (and owned) by the engine's residency."""
from __future__ import annotations

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
