"""Random users of every method, made with HF PEFT itself (the oracle) or by hand (adapters)."""
from __future__ import annotations

import contextlib
import copy

import torch

from peftu_kernels.tenancy import UserModule

# heads * d_kv == d_model so that PEFT's prefix tuning fits; odd sizes otherwise
PEFT_CFG = dict(vocab_size=90, d_model=36, d_kv=12, d_ff=50, num_layers=2, num_heads=3,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False)


def peft_model(hf, config, seed):
    import peft
    torch.manual_seed(seed)
    m = peft.get_peft_model(copy.deepcopy(hf), config)
    with torch.no_grad():  # PEFT initialises LoRA B to 0 and IA3 to 1: make every adapter change the output
        for n, p in m.named_parameters():
            if "lora_magnitude_vector" in n:  # DoRA: around the row norms it starts at, so both parts matter
                p.mul_(1 + torch.randn_like(p) * 0.3)
            elif "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.15)
            elif "ia3_l" in n:
                p.copy_(1 + torch.randn_like(p) * 0.3)
            elif "prompt_encoder" in n:
                p.add_(torch.randn_like(p) * 0.3)
    return m.eval()


def peft_configs():
    import peft
    S = "SEQ_2_SEQ_LM"
    return {
        "lora_qv_r4": peft.LoraConfig(task_type=S, r=4, lora_alpha=8, target_modules=["q", "v"]),
        "lora_all_r7": peft.LoraConfig(task_type=S, r=7, lora_alpha=5, target_modules=["q", "k", "v", "o", "wi_0", "wi_1", "wo"]),
        "lora_rs_r1": peft.LoraConfig(task_type=S, r=1, lora_alpha=3, use_rslora=True, target_modules=["k", "wo"]),
        "dora_qv_r3": peft.LoraConfig(task_type=S, r=3, lora_alpha=6, use_dora=True, target_modules=["q", "v", "wo"]),
        "dora_all_r5": peft.LoraConfig(task_type=S, r=5, lora_alpha=4, use_dora=True, use_rslora=True,
                                       target_modules=["q", "k", "v", "o", "wi_0", "wi_1", "wo"]),
        "ia3": peft.IA3Config(task_type=S),
        "prompt": peft.PromptTuningConfig(task_type=S, num_virtual_tokens=5),
        "ptuning": peft.PromptEncoderConfig(task_type=S, num_virtual_tokens=3, encoder_hidden_size=16),
        "prefix": peft.PrefixTuningConfig(task_type=S, num_virtual_tokens=4),
        "prefix2": peft.PrefixTuningConfig(task_type=S, num_virtual_tokens=2),
    }


def adapter_module(cfg, kind: str, m: int, act: str, seed: int, sites=None) -> UserModule:
    g = torch.Generator().manual_seed(seed)
    D = cfg.d_model
    if sites is None:  # AdapterHub's Houlsby: after self-attention and feed-forward; Pfeiffer: feed-forward only
        sites = []
        for stack, n, ff in (("encoder", cfg.num_layers, 1), ("decoder", cfg.n_dec_layers, 2)):
            for i in range(n):
                if kind == "houlsby":
                    sites.append(f"{stack}.block.{i}.layer.0")
                sites.append(f"{stack}.block.{i}.layer.{ff}")
    t = {}
    for s in sites:
        t[f"{s}.down"] = torch.randn(m, D, generator=g) * 0.3
        t[f"{s}.down_bias"] = torch.randn(m, generator=g) * 0.1
        t[f"{s}.up"] = torch.randn(D, m, generator=g) * 0.3
        t[f"{s}.up_bias"] = torch.randn(D, generator=g) * 0.1
    return UserModule(kind, t, {"act": act})


class PlainHooks:
    """The hooks our T5 calls, doing nothing: one-user oracles override the one they implement."""

    def hold(self, rows):  # the model's entry points hold a handle while they run; a one-user oracle has no lock
        return contextlib.nullcontext()

    def linear(self, site, x, w):
        return torch.nn.functional.linear(x, w)

    def residual(self, site, x, f):
        return x + f

    def prompt(self, x, mask):
        return x, mask

    def prefix_len(self, stack):
        return 0

    def prefix_kv(self, site, k, v):
        return k, v


class SingleAdapter(PlainHooks):
    """A straightforward one-user implementation of the bottleneck adapter hook (no banks, no ops)."""

    def __init__(self, mod: UserModule):
        self.mod = mod
        from peftu_kernels import activations
        self.act = activations.fn(mod.config["act"])

    def residual(self, site, x, f):
        t = self.mod.tensors
        if f"{site}.down" not in t:
            return x + f
        A = lambda h: self.act(h @ t[f"{site}.down"].T + t[f"{site}.down_bias"]) @ t[f"{site}.up"].T + t[f"{site}.up_bias"]
        if self.mod.method == "houlsby":
            return x + f + A(f)
        z = x + f
        return z + A(z)
