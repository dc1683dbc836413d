"""Import and export HF PEFT adapter folders (adapter_config.json + adapter_model.safetensors).

Supported: LORA, IA3, PROMPT_TUNING, P_TUNING (its saved output prompt), PREFIX_TUNING, for T5 seq2seq.
PEFT's seq2seq layouts reproduced here (checked by parity tests against PEFT itself):
- prompt / P-tuning save (num_transformer_submodules * P, D); only the first P rows reach the encoder.
- prefix tuning saves (P, num_layers * 2 * D); decoder self-attention layer i reads rows (4i, 4i+1) mod
  2*num_layers of the (layers*2) axis as keys / values (so layers i and i + num_layers/2 share a prefix).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..io import load_json_object, load_weights, save_json, save_tensors
from ..t5 import T5
from .modules import UserModule, validate

_PREFIX = "base_model.model."
_UNSUPPORTED_LORA = {"use_dora": False, "bias": "none", "modules_to_save": None, "fan_in_fan_out": False,
                     "layer_replication": None, "lora_bias": False, "target_parameters": None,
                     "trainable_token_indices": None, "use_qalora": False, "alora_invocation_tokens": None,
                     "use_bdlora": False, "kasa_config": None, "velora_config": None, "monteclora_config": None,
                     "arrow_config": None}
# LoRA options that change nothing at inference; any other option with a value set is refused by name
_HARMLESS_LORA = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                  "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout",
                  "use_rslora", "init_lora_weights", "layers_to_transform", "layers_pattern", "megatron_config",
                  "megatron_core", "eva_config", "qalora_group_size", "runtime_config", "ensure_weight_tying",
                  "rank_pattern", "alpha_pattern"}
# inits that rewrite the base weights: their adapters are only right on that rewritten base
_BASE_CHANGING_INIT = ("pissa", "olora", "loftq", "corda", "lora_ga")


def _bad(folder, msg):
    raise ValueError(f"{folder}: {msg}")


def import_peft(folder, model: T5) -> UserModule:
    """Read a PEFT folder into a validated UserModule for `model`; raises ValueError naming what is wrong."""
    folder = Path(folder)
    cfg = load_json_object(folder / "adapter_config.json")
    kind = cfg.get("peft_type")
    if cfg.get("task_type") not in (None, "SEQ_2_SEQ_LM"):
        _bad(folder, f"task_type {cfg.get('task_type')!r} is not SEQ_2_SEQ_LM")
    if cfg.get("modules_to_save"):
        _bad(folder, f"modules_to_save={cfg['modules_to_save']!r} is not supported (peftu serves the base's own "
                     f"modules; a saved copy of them would be dropped)")
    w = load_weights(folder, "adapter_model.safetensors", "adapter_model.bin")
    if kind == "LORA":
        mod = _import_lora(folder, cfg, w)
    elif kind == "IA3":
        mod = _import_ia3(folder, cfg, w)
    elif kind in ("PROMPT_TUNING", "P_TUNING"):
        p = w.get("prompt_embeddings")
        n = _n_tokens(folder, cfg)
        if p is None or p.dim() != 2 or p.shape[0] < n:
            _bad(folder, f"needs prompt_embeddings with >= num_virtual_tokens={n} rows")
        mod = UserModule("prompt" if kind == "PROMPT_TUNING" else "ptuning", {"prompt": p[:n].clone()},
                         {"num_virtual_tokens": n, "peft_type": kind})
    elif kind == "PREFIX_TUNING":
        mod = _import_prefix(folder, cfg, w, model)
    else:
        _bad(folder, f"peft_type {kind!r} is not supported (LORA, IA3, PROMPT_TUNING, P_TUNING, PREFIX_TUNING)")
    validate(mod, model, where=str(folder))
    return mod


def _n_tokens(folder, cfg) -> int:
    n = cfg.get("num_virtual_tokens")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        _bad(folder, f"num_virtual_tokens must be a positive int, got {n!r}")
    return n


def _targeted(site: str, targets) -> bool:
    """PEFT's rule: a list matches a module name or a dotted suffix of it; a string is a full-match regex."""
    if isinstance(targets, str):
        return re.fullmatch(targets, site) is not None
    return any(site == t or site.endswith("." + t) for t in targets)


def _site(folder, key: str, suffix: str) -> str:
    if not key.startswith(_PREFIX) or not key.endswith(suffix):
        _bad(folder, f"unexpected tensor name {key!r}")
    return key[len(_PREFIX): -len(suffix)]


def _import_lora(folder, cfg, w) -> UserModule:
    for k, ok in _UNSUPPORTED_LORA.items():
        if cfg.get(k, ok) not in (ok, None, [], {}):
            _bad(folder, f"LoRA option {k}={cfg[k]!r} is not supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        _bad(folder, "LoRA rank_pattern / alpha_pattern are not supported (one rank and alpha per user)")
    unknown = {k: v for k, v in cfg.items() if k not in _HARMLESS_LORA and k not in _UNSUPPORTED_LORA
               and v not in (None, False, [], {}, "")}
    if unknown:
        _bad(folder, f"LoRA option(s) {unknown} are not supported")
    if str(cfg.get("init_lora_weights", True)).lower() in _BASE_CHANGING_INIT:
        _bad(folder, f"init_lora_weights={cfg['init_lora_weights']!r} rewrites the base weights; save the adapter "
                     f"converted to plain LoRA (PEFT's path_initial_model_for_weight_conversion)")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        _bad(folder, f"LoRA rank r must be a positive int, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        _bad(folder, f"lora_alpha must be a number, got {alpha!r}")
    targets = cfg.get("target_modules")
    t = {}
    for k, v in w.items():
        suf = next((x for x in (".lora_A.weight", ".lora_B.weight") if k.endswith(x)), None)
        if suf is None:
            _bad(folder, f"tensor {k!r} is not a LoRA A/B weight (LoRA variants that save other tensors, such as "
                         f"DoRA, KaSA or BD-LoRA, are not supported)")
        site = _site(folder, k, suf)
        if isinstance(targets, (str, list)) and not _targeted(site, targets):
            _bad(folder, f"tensor {k!r} is for {site!r}, which target_modules={targets!r} does not name "
                         f"(PEFT refuses this folder too)")
        t[f"{site}.{suf.split('.')[1]}"] = v
    return UserModule("lora", t, {"r": r, "alpha": alpha, "use_rslora": bool(cfg.get("use_rslora"))})


def _import_ia3(folder, cfg, w) -> UserModule:
    t = {}
    for k, v in w.items():
        s = _site(folder, k, ".ia3_l")
        t[f"{s}.ia3_in" if v.shape[0] == 1 else f"{s}.ia3_out"] = v.reshape(-1).clone()
    return UserModule("ia3", t, {})


def _prefix_rows(i: int, L: int) -> tuple[int, int]:
    return (4 * i) % (2 * L), (4 * i + 1) % (2 * L)


def _import_prefix(folder, cfg, w, model: T5) -> UserModule:
    c = model.cfg
    if cfg.get("prefix_projection") and "prompt_embeddings" not in w:
        _bad(folder, "prefix_projection without saved prompt_embeddings")
    p = w.get("prompt_embeddings")
    L, P, D = cfg.get("num_layers"), _n_tokens(folder, cfg), cfg.get("token_dim")
    if D != c.inner_dim or cfg.get("num_attention_heads") != c.num_heads:
        _bad(folder, f"token_dim={D} / num_attention_heads={cfg.get('num_attention_heads')} do not fit this model's "
                     f"attention ({c.num_heads} heads x {c.d_kv})")
    if not isinstance(L, int) or L < c.n_dec_layers or p is None or tuple(p.shape) != (P, L * 2 * D):
        _bad(folder, f"prompt_embeddings {None if p is None else tuple(p.shape)} does not fit num_layers={L}, "
                     f"num_virtual_tokens={P}, token_dim={D} for a {c.n_dec_layers}-layer decoder")
    kv = p.view(P, 2 * L, c.num_heads, c.d_kv).permute(1, 2, 0, 3)  # (2L, H, P, dk)
    t = {}
    for i in range(c.n_dec_layers):
        rk, rv = _prefix_rows(i, L)
        s = f"decoder.block.{i}.layer.0.SelfAttention"
        t[f"{s}.prefix_k"], t[f"{s}.prefix_v"] = kv[rk].clone(), kv[rv].clone()
    return UserModule("prefix", t, {"semantics": "peft", "num_layers": L})


def export_peft(mod: UserModule, folder, model: T5) -> None:
    """Write `mod` as a PEFT folder that `PeftModel.from_pretrained` loads."""
    folder, c = Path(folder), model.cfg
    base = {"task_type": "SEQ_2_SEQ_LM", "inference_mode": True, "base_model_name_or_path": None,
            "revision": None, "auto_mapping": None, "modules_to_save": None}
    if mod.method == "lora":
        targets = sorted({s.rsplit(".", 1)[1] for s in mod.sites()})
        cfg = {**base, "peft_type": "LORA", "r": mod.config["r"], "lora_alpha": mod.config.get("alpha", mod.config["r"]),
               "use_rslora": mod.config.get("use_rslora", False), "target_modules": targets, "lora_dropout": 0.0,
               "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True}
        w = {f"{_PREFIX}{k.rsplit('.', 1)[0]}.{k.rsplit('.', 1)[1]}.weight": v for k, v in mod.tensors.items()}
    elif mod.method == "ia3":
        sites = {k.rsplit(".", 1)[0]: k.rsplit(".", 1)[1] for k in mod.tensors}
        ff = sorted({s.rsplit(".", 1)[1] for s, side in sites.items() if side == "ia3_in"})
        cfg = {**base, "peft_type": "IA3", "target_modules": sorted({s.rsplit(".", 1)[1] for s in sites}),
               "feedforward_modules": ff, "fan_in_fan_out": False, "init_ia3_weights": True}
        w = {f"{_PREFIX}{k.rsplit('.', 1)[0]}.ia3_l": (v[None, :] if k.endswith("ia3_in") else v[:, None])
             for k, v in mod.tensors.items()}
    elif mod.method in ("prompt", "ptuning"):
        p = mod.tensors["prompt"]
        cfg = {**base, "peft_type": "PROMPT_TUNING" if mod.method == "prompt" else "P_TUNING",
               "num_virtual_tokens": p.shape[0], "token_dim": c.d_model, "num_transformer_submodules": 2,
               "num_attention_heads": c.num_heads, "num_layers": c.num_layers}
        if mod.method == "prompt":
            cfg["prompt_tuning_init"] = "RANDOM"
        else:
            cfg.update(encoder_reparameterization_type=mod.config.get("encoder_type", "MLP"),
                       encoder_hidden_size=mod.config.get("encoder_hidden_size", c.d_model))
        w = {"prompt_embeddings": torch.cat([p, p], 0)}  # PEFT's seq2seq layout: the decoder half is unused
    elif mod.method == "prefix":
        w, cfg = _export_prefix(mod, c, base)
    else:
        raise ValueError(f"method {mod.method!r} has no HF PEFT format (PEFT has no bottleneck adapters)")
    save_tensors(folder / "adapter_model.safetensors", w, {"format": "pt"})
    save_json(folder / "adapter_config.json", cfg)


def _export_prefix(mod: UserModule, c, base):
    L = mod.config.get("num_layers", c.num_layers)
    first = mod.tensors["decoder.block.0.layer.0.SelfAttention.prefix_k"]
    H, P, dk = first.shape
    kv = torch.zeros(2 * L, H, P, dk, dtype=first.dtype)
    seen = {}
    for i in range(c.n_dec_layers):
        s = f"decoder.block.{i}.layer.0.SelfAttention"
        for row, t in zip(_prefix_rows(i, L), (mod.tensors[s + ".prefix_k"], mod.tensors[s + ".prefix_v"])):
            if row in seen and not torch.equal(seen[row], t):
                raise ValueError(f"prefix of decoder layer {i} differs from another layer that PEFT's layout makes "
                                 f"it share (row {row} of {2 * L}); this module cannot be written as a PEFT folder")
            seen[row] = kv[row] = t
    cfg = {**base, "peft_type": "PREFIX_TUNING", "num_virtual_tokens": P, "token_dim": H * dk,
           "num_transformer_submodules": 2, "num_attention_heads": H, "num_layers": L, "prefix_projection": False,
           "encoder_hidden_size": H * dk}
    return {"prompt_embeddings": kv.permute(2, 0, 1, 3).reshape(P, 2 * L * H * dk)}, cfg
