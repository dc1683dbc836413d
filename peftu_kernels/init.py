"""Fresh per-user modules for training, initialised as HF PEFT / AdapterHub do, deterministic per (user, seed)."""
from __future__ import annotations

import hashlib
import math

import torch

from .t5 import T5, Attention, Linear, SubLayer
from .tenancy.modules import UserModule

PAPER = {  # the PEFT-U paper's settings (SPEC.md section 4) where it gives them
    "lora": dict(r=8, alpha=32, targets=("q", "v")),
    "ia3": dict(targets=("k", "v", "wo"), feedforward=("wo",)),
    "houlsby": dict(reduction_factor=16, act="silu"),
    "pfeiffer": dict(reduction_factor=16, act="relu"),
    "prompt": dict(num_virtual_tokens=20),
    "prefix": dict(num_virtual_tokens=20),
    "ptuning": dict(num_virtual_tokens=20, encoder_type="LSTM", encoder_hidden_size=128),
}


def user_generator(user: str, seed: int) -> torch.Generator:
    h = int.from_bytes(hashlib.sha256(f"{seed}/{user}".encode()).digest()[:8], "little")
    return torch.Generator().manual_seed(h)


def new_module(model: T5, method: str, user: str, seed: int = 42, **hp) -> UserModule:
    """A freshly initialised module of `method` for `user` (same user and seed -> same tensors)."""
    hp = {**PAPER[method], **hp}
    g, c = user_generator(user, seed), model.cfg
    rand = lambda *shape, std=1.0: torch.randn(*shape, generator=g) * std
    names = dict(model.named_modules())
    t = {}
    if method == "lora":  # PEFT: A kaiming-uniform(a=sqrt(5)), B zeros
        r = hp["r"]
        for n, m in names.items():
            if isinstance(m, Linear) and n.rsplit(".", 1)[1] in hp["targets"]:
                bound = 1 / math.sqrt(m.in_features)
                t[n + ".lora_A"] = (torch.rand(r, m.in_features, generator=g) * 2 - 1) * bound
                t[n + ".lora_B"] = torch.zeros(m.out_features, r)
        return UserModule("lora", t, {"r": r, "alpha": hp["alpha"], "use_rslora": hp.get("use_rslora", False)})
    if method == "ia3":  # PEFT: ones; feed-forward targets scale their input
        for n, m in names.items():
            if isinstance(m, Linear) and n.rsplit(".", 1)[1] in hp["targets"]:
                ff = n.rsplit(".", 1)[1] in hp["feedforward"]
                t[n + (".ia3_in" if ff else ".ia3_out")] = torch.ones(m.in_features if ff else m.out_features)
        return UserModule("ia3", t, {})
    if method in ("houlsby", "pfeiffer"):  # AdapterHub: small normal down, near-zero up (starts as identity)
        m_dim = max(1, c.d_model // hp["reduction_factor"])
        for n, m in names.items():
            if not isinstance(m, SubLayer) or m.inner_name == "EncDecAttention":
                continue
            if method == "pfeiffer" and m.inner_name != "DenseReluDense":
                continue
            t[n + ".down"], t[n + ".down_bias"] = rand(m_dim, c.d_model, std=1e-2), torch.zeros(m_dim)
            t[n + ".up"], t[n + ".up_bias"] = rand(c.d_model, m_dim, std=1e-2), torch.zeros(c.d_model)
        return UserModule(method, t, {"act": hp["act"], "reduction_factor": hp["reduction_factor"]})
    if method == "prompt":  # PEFT's RANDOM init: nn.Embedding's N(0, 1)
        P = hp["num_virtual_tokens"]
        return UserModule("prompt", {"prompt": rand(P, c.d_model)}, {"num_virtual_tokens": P})
    if method == "prefix":
        P = hp["num_virtual_tokens"]
        for n, m in names.items():
            if isinstance(m, Attention) and n.startswith("decoder.") and n.endswith("layer.0.SelfAttention"):
                t[n + ".prefix_k"], t[n + ".prefix_v"] = rand(c.num_heads, P, c.d_kv), rand(c.num_heads, P, c.d_kv)
        return UserModule("prefix", t, {"semantics": "peft", "num_layers": c.num_layers})
    if method == "ptuning":
        from .ptuning import PromptEncoder
        enc = PromptEncoder(hp["num_virtual_tokens"], c.d_model, hp["encoder_hidden_size"], hp["encoder_type"], g)
        t = {f"prompt_encoder.{k}": v.detach().clone() for k, v in enc.state_dict().items()}
        with torch.no_grad():
            t["prompt"] = enc().detach()
        return UserModule("ptuning", t, {k: hp[k] for k in ("num_virtual_tokens", "encoder_type", "encoder_hidden_size")})
    raise ValueError(f"unknown method {method!r}")
