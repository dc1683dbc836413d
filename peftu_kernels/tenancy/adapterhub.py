"""Import and export AdapterHub (`adapters` library) adapter folders for T5, with its exact semantics.

A folder holds adapter_config.json and pytorch_adapter.bin (read with weights_only=True) or
adapter.safetensors. Supported (anything else is refused, naming the option):
- bottleneck, Houlsby (DoubleSeqBnConfig: after self-attention and feed-forward, `x + f + A(f)`) and
  Pfeiffer (SeqBnConfig: after feed-forward, `z = x + f; z + A(z)`), A(h) = up(act(down h + b) ) + b';
- IA3 (its LoRA with composition "scale"): output scaling of k, v (every attention) and wi_1 / wi, times alpha;
- LoRA ("add"): q, k, v (every attention), intermediate and output linears, scaling alpha / r;
- prefix tuning, MLP-reparameterised (wte -> Linear -> act -> Linear) or flat: per location (encoder self,
  decoder self, cross) a (P, layers * 2, H, d_kv) tensor, layer i reading rows 2i, 2i+1 as keys / values.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..io import load_json_object, load_weights, save_json, save_tensors
from ..ops.reference import ACT
from ..t5 import T5
from .modules import UserModule, validate

_ACT = {"relu": "relu", "swish": "silu", "silu": "silu", "gelu": "gelu", "gelu_new": "gelu_new", "tanh": "tanh",
        "sigmoid": "sigmoid"}
_BN_DEFAULTS = {"phm_layer": False, "use_gating": False, "ln_before": False, "ln_after": False, "is_parallel": False,
                "cross_adapter": False, "adapter_residual_before_ln": False, "residual_before_ln": True,
                "scaling": 1.0, "inv_adapter": None, "stochastic_depth": 0.0, "leave_out": []}
_LORA_DEFAULTS = {"use_gating": False, "use_dora": False, "leave_out": [], "vera_d": None, "vera_b": None}
_PREFIX_DEFAULTS = {"use_gating": False, "leave_out": []}
_LOC = {"encoder_prefix": "encoder", "self_prefix": "decoder", "cross_prefix": "cross"}


def _bad(folder, msg):
    raise ValueError(f"{folder}: {msg}")


def _check_opts(folder, cfg: dict, defaults: dict):
    for k, ok in defaults.items():
        v = cfg.get(k, ok)
        if v != ok and not (ok == [] and not v):
            _bad(folder, f"AdapterHub option {k}={v!r} is not supported (peftu serves {k}={ok!r})")


def import_adapterhub(folder, model: T5) -> UserModule:
    folder = Path(folder)
    meta = load_json_object(folder / "adapter_config.json")
    cfg, name = meta.get("config"), meta.get("name")
    if meta.get("model_type", "t5") != "t5":
        _bad(folder, f"model_type {meta.get('model_type')!r}: only T5 adapters are served")
    if not isinstance(cfg, dict) or name is None:
        _bad(folder, "adapter_config.json has no 'config' dict or 'name' (composition blocks are not supported)")
    arch = cfg.get("architecture", "bottleneck")
    w = load_weights(folder, "adapter.safetensors", "pytorch_adapter.bin")
    if arch in (None, "bottleneck"):
        mod = _bottleneck(folder, cfg, name, w, model)
    elif arch == "lora":
        mod = _lora(folder, cfg, name, w)
    elif arch == "prefix_tuning":
        mod = _prefix(folder, cfg, name, w, model)
    else:
        _bad(folder, f"architecture {arch!r} is not supported (bottleneck, lora / IA3, prefix_tuning)")
    validate(mod, model, where=str(folder))
    return mod


def _bottleneck(folder, cfg, name, w, model) -> UserModule:
    _check_opts(folder, cfg, _BN_DEFAULTS)
    act = _ACT.get(str(cfg.get("non_linearity", "relu")).lower())
    if act is None:
        _bad(folder, f"non_linearity {cfg.get('non_linearity')!r} is not supported; known {sorted(_ACT)}")
    mh, out, before, after = (cfg.get(k) for k in ("mh_adapter", "output_adapter", "original_ln_before",
                                                    "original_ln_after"))
    if after is not True or not isinstance(cfg.get("reduction_factor"), (int, float)):
        _bad(folder, f"original_ln_after={after!r} / reduction_factor={cfg.get('reduction_factor')!r} not supported")
    if mh and out and not before:
        kind = "houlsby"
    elif out and not mh and before:
        kind = "pfeiffer"
    else:
        _bad(folder, f"bottleneck placement mh_adapter={mh}, output_adapter={out}, original_ln_before={before} is "
                     f"neither Houlsby (DoubleSeqBn) nor Pfeiffer (SeqBn)")
    t, infix = {}, f".adapters.{name}."
    parts = {"adapter_down.0.weight": "down", "adapter_down.0.bias": "down_bias", "adapter_up.weight": "up",
             "adapter_up.bias": "up_bias"}
    for k, v in w.items():
        if infix not in k:
            _bad(folder, f"unexpected tensor {k!r}")
        site, rest = k.split(infix)
        if rest not in parts:
            _bad(folder, f"unexpected tensor {k!r} (only down/up linears are supported)")
        t[f"{site}.{parts[rest]}"] = v.clone()
    return UserModule(kind, t, {"act": act, "reduction_factor": cfg["reduction_factor"], "format": "adapterhub"})


def _lora(folder, cfg, name, w) -> UserModule:
    _check_opts(folder, cfg, _LORA_DEFAULTS)
    infix = f".loras.{name}."
    if cfg.get("composition_mode") == "scale":  # IA3
        if cfg.get("r") != 1:
            _bad(folder, "IA3 (composition_mode 'scale') needs r == 1")
        alpha, t = cfg.get("alpha", 1), {}
        for k, v in w.items():
            if not k.endswith(infix + "lora_B"):
                _bad(folder, f"unexpected tensor {k!r} for IA3")
            t[k.split(infix)[0] + ".ia3_out"] = v.reshape(-1) * alpha
        return UserModule("ia3", t, {"format": "adapterhub"})
    if cfg.get("composition_mode", "add") != "add":
        _bad(folder, f"composition_mode {cfg.get('composition_mode')!r} is not supported")
    t = {}
    for k, v in w.items():
        if infix not in k or k.split(infix)[1] not in ("lora_A", "lora_B"):
            _bad(folder, f"unexpected tensor {k!r} for LoRA")
        site, part = k.split(infix)
        t[f"{site}.{part}"] = v.clone()
    return UserModule("lora", t, {"r": cfg["r"], "alpha": cfg.get("alpha", 8), "format": "adapterhub"})


def _prefix(folder, cfg, name, w, model) -> UserModule:
    _check_opts(folder, cfg, _PREFIX_DEFAULTS)
    c, P = model.cfg, cfg.get("prefix_length")
    if not isinstance(P, int) or isinstance(P, bool) or P < 1:
        _bad(folder, f"prefix_length must be a positive int, got {P!r}")
    H, dk = c.num_heads, c.d_kv
    act = ACT.get(_ACT.get(str(cfg.get("non_linearity", "tanh")).lower(), ""))
    pool = f"prefix_tuning.prefix_tunings.{name}."
    t = {}
    for key, stack in _LOC.items():
        p = pool + key + "."
        if cfg.get("flat"):
            flat = w.get(p + "control_trans")
            if flat is None:
                continue
            if flat.numel() % (P * H * dk):
                _bad(folder, f"{key}: control_trans has {flat.numel()} values, not a multiple of prefix_length "
                             f"{P} x {H} heads x {dk} (is prefix_length right?)")
            kv = flat.reshape(P, -1, H, dk)
        else:
            if p + "wte.weight" not in w:
                continue
            if act is None:
                _bad(folder, f"non_linearity {cfg.get('non_linearity')!r} is not supported")
            need = [p + n for n in ("control_trans.0.weight", "control_trans.0.bias", "control_trans.2.weight",
                                    "control_trans.2.bias")]
            if [n for n in need if n not in w]:
                _bad(folder, f"{key}: MLP prefix without {[n for n in need if n not in w]}")
            if w[p + "wte.weight"].shape[0] != P:
                _bad(folder, f"{key}: wte has {w[p + 'wte.weight'].shape[0]} rows, prefix_length is {P}")
            if w[p + "control_trans.2.weight"].shape[0] % (H * dk):
                _bad(folder, f"{key}: control_trans output {w[p + 'control_trans.2.weight'].shape[0]} does not "
                             f"split into {H} heads x {dk}")
            with torch.no_grad():
                h = act(w[p + "wte.weight"] @ w[p + "control_trans.0.weight"].T + w[p + "control_trans.0.bias"])
                kv = (h @ w[p + "control_trans.2.weight"].T + w[p + "control_trans.2.bias"]).view(P, -1, H, dk)
        kv = kv.permute(1, 2, 0, 3)  # (layers * 2, H, P, dk)
        sites = _sites(stack, c)
        if kv.shape[0] != 2 * len(sites):
            _bad(folder, f"{key} has {kv.shape[0] // 2} layers, the model's {stack} has {len(sites)}")
        for i, s in enumerate(sites):
            t[f"{s}.prefix_k"], t[f"{s}.prefix_v"] = kv[2 * i].clone(), kv[2 * i + 1].clone()
    if not t:
        _bad(folder, f"no prefix weights for adapter {name!r}")
    return UserModule("prefix", t, {"semantics": "adapterhub", "format": "adapterhub"})


def _sites(stack: str, c) -> list[str]:
    if stack == "encoder":
        return [f"encoder.block.{i}.layer.0.SelfAttention" for i in range(c.num_layers)]
    if stack == "decoder":
        return [f"decoder.block.{i}.layer.0.SelfAttention" for i in range(c.n_dec_layers)]
    return [f"decoder.block.{i}.layer.1.EncDecAttention" for i in range(c.n_dec_layers)]


def export_adapterhub(mod: UserModule, folder, model: T5, name: str = "adapter") -> None:
    """Write `mod` as an AdapterHub folder (adapter.safetensors + adapter_config.json); prefixes in flat form."""
    folder, c = Path(folder), model.cfg
    base = {"model_type": "t5", "model_class": "T5ForConditionalGeneration", "model_name": "", "name": name,
            "hidden_size": c.d_model, "version": "adapters.1.3.0"}
    if mod.method in ("houlsby", "pfeiffer"):
        inv = {"relu": "relu", "silu": "swish", "gelu": "gelu", "gelu_new": "gelu_new", "tanh": "tanh",
               "sigmoid": "sigmoid"}
        m = next(v for k, v in mod.tensors.items() if k.endswith(".down")).shape[0]
        hou = mod.method == "houlsby"
        cfg = {**_BN_DEFAULTS, "architecture": "bottleneck", "mh_adapter": hou, "output_adapter": True,
               "original_ln_before": not hou, "original_ln_after": True, "non_linearity": inv[mod.config["act"]],
               "reduction_factor": mod.config.get("reduction_factor", c.d_model // m), "init_weights": "bert",
               "dropout": 0.0}
        parts = {"down": "adapter_down.0.weight", "down_bias": "adapter_down.0.bias", "up": "adapter_up.weight",
                 "up_bias": "adapter_up.bias"}
        w = {f"{k.rsplit('.', 1)[0]}.adapters.{name}.{parts[k.rsplit('.', 1)[1]]}": v for k, v in mod.tensors.items()}
    elif mod.method == "lora":
        cfg = {**_LORA_DEFAULTS, "architecture": "lora", "composition_mode": "add", "r": mod.config["r"],
               "alpha": mod.config.get("alpha", mod.config["r"]), "selfattn_lora": True, "dropout": 0.0,
               "attn_matrices": sorted({k.rsplit(".", 2)[1] for k in mod.tensors if ".SelfAttention." in k or ".EncDecAttention." in k}),
               "intermediate_lora": any(".wi" in k for k in mod.tensors), "output_lora": any(".wo." in k for k in mod.tensors),
               "init_weights": "lora"}
        w = {f"{k.rsplit('.', 1)[0]}.loras.{name}.{k.rsplit('.', 1)[1]}": v for k, v in mod.tensors.items()}
    elif mod.method == "ia3":
        if any(k.endswith(".ia3_in") for k in mod.tensors):
            raise ValueError("IA3 input scaling (PEFT's feed-forward form) has no AdapterHub equivalent")
        cfg = {**_LORA_DEFAULTS, "architecture": "lora", "composition_mode": "scale", "r": 1, "alpha": 1,
               "selfattn_lora": True, "intermediate_lora": True, "output_lora": False, "attn_matrices": ["k", "v"],
               "init_weights": "ia3", "dropout": 0.0}
        w = {f"{k.rsplit('.', 1)[0]}.loras.{name}.lora_B": v[:, None] for k, v in mod.tensors.items()}
    elif mod.method == "prefix" and mod.config.get("semantics") == "adapterhub":
        P = next(iter(mod.tensors.values())).shape[1]
        w, flags = {}, {}
        for key, stack in _LOC.items():
            sites = _sites(stack, c)
            flags[key.replace("self_prefix", "")] = sites[0] + ".prefix_k" in mod.tensors
            if sites[0] + ".prefix_k" not in mod.tensors:
                continue
            kv = torch.stack([mod.tensors[f"{s}.prefix_{n}"] for s in sites for n in ("k", "v")])  # (2L, H, P, dk)
            w[f"prefix_tuning.prefix_tunings.{name}.{key}.control_trans"] = kv.permute(2, 0, 1, 3).reshape(-1)
        cfg = {**_PREFIX_DEFAULTS, "architecture": "prefix_tuning", "flat": True, "prefix_length": P,
               "encoder_prefix": flags["encoder_prefix"], "cross_prefix": flags["cross_prefix"],
               "bottleneck_size": 512, "non_linearity": "tanh", "dropout": 0.0, "shared_gating": True}
    else:
        raise ValueError(f"method {mod.method!r} ({mod.config.get('semantics', '')}) has no AdapterHub form")
    save_tensors(folder / "adapter.safetensors", w, {"format": "pt"})
    save_json(folder / "adapter_config.json", {**base, "config": cfg})
