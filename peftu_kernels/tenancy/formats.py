"""What the HF PEFT and AdapterHub readers share with the method files: errors that name the folder, PEFT's
tensor-name and target rules, option checks."""
from __future__ import annotations

import re

PEFT_PREFIX = "base_model.model."


def bad(folder, msg):
    raise ValueError(f"{folder}: {msg}")


def n_tokens(folder, cfg, key: str = "num_virtual_tokens") -> int:
    n = cfg.get(key)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        bad(folder, f"{key} must be a positive int, got {n!r}")
    return n


def targeted(site: str, targets) -> bool:
    """PEFT's rule: a list matches a module name or a dotted suffix of it; a string is a full-match regex."""
    if isinstance(targets, str):
        return re.fullmatch(targets, site) is not None
    return any(site == t or site.endswith("." + t) for t in targets)


def peft_site(folder, key: str, suffix: str) -> str:
    """'base_model.model.<site><suffix>' -> site; anything else is refused, naming the tensor."""
    if not key.startswith(PEFT_PREFIX) or not key.endswith(suffix):
        bad(folder, f"unexpected tensor name {key!r}")
    return key[len(PEFT_PREFIX): -len(suffix)]


def peft_base_config() -> dict:
    return {"task_type": "SEQ_2_SEQ_LM", "inference_mode": True, "base_model_name_or_path": None,
            "revision": None, "auto_mapping": None, "modules_to_save": None}


def check_opts(folder, cfg: dict, defaults: dict):
    """AdapterHub: every option that changes the computation must have the value peftu serves."""
    for k, ok in defaults.items():
        v = cfg.get(k, ok)
        if v != ok and not (ok == [] and not v):
            bad(folder, f"AdapterHub option {k}={v!r} is not supported (peftu serves {k}={ok!r})")


def sites_of(model, kind) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, kind)}
