"""Import and export HF PEFT adapter folders (adapter_config.json + adapter_model.safetensors / .bin).

What each peft_type means is its method file's business (tenancy/methods/); this file reads the folder,
checks what holds for every type, and asks the registry which method reads it (checked by parity tests
against PEFT itself).
"""
from __future__ import annotations

from pathlib import Path

from ..io import load_json_object, load_weights, save_json, save_tensors
from ..t5 import T5
from . import methods
from .formats import bad
from .methods import validate
from .modules import UserModule


def reader(cfg: dict):
    """The method that reads a PEFT config: among those listing its peft_type, the highest priority that
    claims it; None when no method does."""
    kind = cfg.get("peft_type")
    cands = sorted((m for m in methods.all_methods() if kind in m.peft_types), key=lambda m: -m.peft_priority)
    return next((m for m in cands if m.claims_peft(cfg)), None), cands


def import_peft(folder, model: T5) -> UserModule:
    """Read a PEFT folder into a validated UserModule for `model`; raises ValueError naming what is wrong."""
    folder = Path(folder)
    cfg = load_json_object(folder / "adapter_config.json")
    if cfg.get("task_type") not in (None, "SEQ_2_SEQ_LM"):
        bad(folder, f"task_type {cfg.get('task_type')!r} is not SEQ_2_SEQ_LM")
    if cfg.get("modules_to_save"):
        bad(folder, f"modules_to_save={cfg['modules_to_save']!r} is not supported (peftu serves the base's own "
                    f"modules; a saved copy of them would be dropped)")
    w = load_weights(folder, "adapter_model.safetensors", "adapter_model.bin")
    m, cands = reader(cfg)
    if m is None and cands:
        m = cands[-1]  # the plain reader of that type names the option it refuses
    if m is None:
        known = sorted({t for x in methods.all_methods() for t in x.peft_types})
        bad(folder, f"peft_type {cfg.get('peft_type')!r} is not supported ({', '.join(known)})")
    mod = m.from_peft(folder, cfg, w, model)
    validate(mod, model, where=str(folder))
    return mod


def export_peft(mod: UserModule, folder, model: T5) -> None:
    """Write `mod` as a PEFT folder that `PeftModel.from_pretrained` loads."""
    cfg, w = methods.get(mod.method).to_peft(mod, model)
    folder = Path(folder)
    save_tensors(folder / "adapter_model.safetensors", w, {"format": "pt"})
    save_json(folder / "adapter_config.json", cfg)
