"""Import and export AdapterHub (`adapters` library) adapter folders for T5, with its exact semantics.

A folder holds adapter_config.json and pytorch_adapter.bin (read with weights_only=True) or
adapter.safetensors. Which architectures mean what is the method files' business (tenancy/methods/:
bottleneck Houlsby / Pfeiffer, LoRA, IA3 as LoRA with composition "scale", prefix tuning); anything else is
refused, naming the option.
"""
from __future__ import annotations

from pathlib import Path

from ..io import load_json_object, load_weights, save_json, save_tensors
from ..t5 import T5
from . import methods
from .formats import bad
from .methods import validate
from .modules import UserModule


def import_adapterhub(folder, model: T5) -> UserModule:
    folder = Path(folder)
    meta = load_json_object(folder / "adapter_config.json")
    cfg, name = meta.get("config"), meta.get("name")
    if meta.get("model_type", "t5") != "t5":
        bad(folder, f"model_type {meta.get('model_type')!r}: only T5 adapters are served")
    if not isinstance(cfg, dict) or name is None:
        bad(folder, "adapter_config.json has no 'config' dict or 'name' (composition blocks are not supported)")
    arch = cfg.get("architecture") or "bottleneck"
    w = load_weights(folder, "adapter.safetensors", "pytorch_adapter.bin")
    cands = [m for m in methods.all_methods() if arch in m.adapterhub]
    m = next((m for m in cands if m.claims_adapterhub(cfg)), None)
    if m is None:
        known = sorted({a for x in methods.all_methods() for a in x.adapterhub})
        bad(folder, f"architecture {arch!r} with composition_mode={cfg.get('composition_mode')!r} is not supported "
                    f"(architectures: {', '.join(known)})")
    mod = m.from_adapterhub(folder, cfg, name, w, model)
    validate(mod, model, where=str(folder))
    return mod


def export_adapterhub(mod: UserModule, folder, model: T5, name: str = "adapter") -> None:
    """Write `mod` as an AdapterHub folder (adapter.safetensors + adapter_config.json); prefixes in flat form."""
    cfg, w = methods.get(mod.method).to_adapterhub(mod, model, name)
    c = model.cfg
    base = {"model_type": "t5", "model_class": "T5ForConditionalGeneration", "model_name": "", "name": name,
            "hidden_size": c.d_model, "version": "adapters.1.3.0"}
    folder = Path(folder)
    save_tensors(folder / "adapter.safetensors", w, {"format": "pt"})
    save_json(folder / "adapter_config.json", {**base, "config": cfg})
