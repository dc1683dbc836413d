"""Random modules of every method (and two-module users) for the tenancy tests, made by hand on any T5."""
from __future__ import annotations

import torch

from peft_users import adapter_module
from peftu_kernels.tenancy import UserModule

KINDS = ("lora", "ia3", "houlsby", "pfeiffer", "prompt", "ptuning", "prefix", "prefix_ah", "lora+prompt", "dora")


def _prefix(cfg, seed, P, stacks, semantics):
    g = torch.Generator().manual_seed(seed)
    sites = []
    if "encoder" in stacks:
        sites += [f"encoder.block.{i}.layer.0.SelfAttention" for i in range(cfg.num_layers)]
    if "decoder" in stacks:
        sites += [f"decoder.block.{i}.layer.0.SelfAttention" for i in range(cfg.n_dec_layers)]
    if "cross" in stacks:
        sites += [f"decoder.block.{i}.layer.1.EncDecAttention" for i in range(cfg.n_dec_layers)]
    t = {f"{s}.prefix_{n}": torch.randn(cfg.num_heads, P, cfg.d_kv, generator=g) for s in sites for n in "kv"}
    return UserModule("prefix", t, {"semantics": semantics})


def make(cfg, kind: str, seed: int) -> list[UserModule]:
    """A user's module list of `kind`; sizes vary with the seed so banks pad (ranks, widths, lengths)."""
    g = torch.Generator().manual_seed(seed)
    r = 1 + seed % 5
    if kind == "lora":
        t = {}
        for s, (i, o) in {"encoder.block.0.layer.0.SelfAttention.q": (cfg.d_model, cfg.inner_dim),
                          "decoder.block.0.layer.1.EncDecAttention.v": (cfg.d_model, cfg.inner_dim),
                          "decoder.block.0.layer.2.DenseReluDense.wo": (cfg.d_ff, cfg.d_model)}.items():
            t[s + ".lora_A"] = torch.randn(r, i, generator=g) * 0.5
            t[s + ".lora_B"] = torch.randn(o, r, generator=g) * 0.5
        return [UserModule("lora", t, {"r": r, "alpha": 2 * r})]
    if kind == "ia3":
        return [UserModule("ia3", {"encoder.block.0.layer.0.SelfAttention.k.ia3_out":
                                   1 + torch.randn(cfg.inner_dim, generator=g) * 0.5,
                                   "decoder.block.0.layer.2.DenseReluDense.wo.ia3_in":
                                   1 + torch.randn(cfg.d_ff, generator=g) * 0.5})]
    if kind in ("houlsby", "pfeiffer"):
        return [adapter_module(cfg, kind, 1 + seed % 4, "relu" if kind == "pfeiffer" else "silu", seed)]
    if kind in ("prompt", "ptuning"):
        return [UserModule(kind, {"prompt": torch.randn(1 + seed % 4, cfg.d_model, generator=g)})]
    if kind == "prefix":
        return [_prefix(cfg, seed, 1 + seed % 3, ("decoder",), "peft")]
    if kind == "prefix_ah":
        return [_prefix(cfg, seed, 1 + seed % 3, ("encoder", "cross"), "adapterhub")]
    if kind == "dora":  # LoRA's tensors plus a magnitude per output feature, on sites of another shape
        mod = make(cfg, "lora", seed)[0]
        for s in mod.sites():
            out = mod.tensors[s + ".lora_B"].shape[0]
            mod.tensors[s + ".magnitude"] = 0.5 + torch.rand(out, generator=g) * 3
        return [UserModule("dora", mod.tensors, mod.config)]
    if kind == "lora+prompt":
        return make(cfg, "lora", seed) + make(cfg, "prompt", seed + 1)
    raise ValueError(kind)
