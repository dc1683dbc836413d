"""Prompt tuning (Lester et al. 2021): each user's P virtual tokens before its encoder input.

Tensor: `prompt` (P, D). Bank: prompts (S, Pmax, D) right-aligned, lengths (S,) (kept on the host too, so
that a batch's prompt width is known without a sync). The batch pads every row's prompt on the left to the
batch's longest (masked; T5's relative bias makes the padding invisible). Op: `prompt_prepend`.
HF PEFT: PROMPT_TUNING (seq2seq folders save (2P, D); only the first P rows reach the encoder).
"""
from __future__ import annotations

import torch

from .. import formats as fm
from ..modules import UserModule
from . import register
from .base import Bank, Method, pad


class PromptBank(Bank):
    """Served prompts of prompt tuning and P-tuning alike."""
    hooks = ("prompt",)

    def __init__(self, key, model, device, dtype):
        super().__init__(key, model, device, dtype)
        self.prompts = torch.zeros(0, 0, 0, dtype=dtype, device=device)
        self.lengths = torch.zeros(0, dtype=torch.long, device=device)
        self.host_len: list[int] = []

    def _grow_extra(self, n):
        self.prompts, self.lengths = pad(self.prompts, 0, n), pad(self.lengths, 0, n)
        self.host_len += [0] * (n - len(self.host_len))

    def write(self, slot: int, mod: UserModule) -> None:
        p = self._t(mod.tensors["prompt"])
        if self.prompts.shape[2] == 0:
            self.prompts = torch.zeros(self.slots, p.shape[0], p.shape[1], dtype=self.dtype, device=self.device)
        if self.prompts.shape[1] < p.shape[0]:  # left-pad so existing users stay right-aligned
            extra = p.shape[0] - self.prompts.shape[1]
            self.prompts = torch.cat([self.prompts.new_zeros(self.slots, extra, p.shape[1]), self.prompts], 1)
        self.clear(slot)
        self.prompts[slot, self.prompts.shape[1] - p.shape[0]:] = p
        self.lengths[slot], self.host_len[slot] = p.shape[0], p.shape[0]

    def clear(self, slot: int) -> None:
        if self.prompts.numel():
            self.prompts[slot] = 0
        self.lengths[slot], self.host_len[slot] = 0, 0

    def _read(self, slot, key, v, like):
        return self.prompts[slot, self.prompts.shape[1] - v.shape[0]:] if key == "prompt" else v

    def trainable(self):
        return [self.prompts]

    def use(self, prompts: torch.Tensor) -> None:
        """Serve `prompts` (same shape; a trainer's P-tuning output, with its autograd graph) from now on."""
        if prompts.shape != self.prompts.shape:
            raise ValueError(f"prompt bank: new prompts {tuple(prompts.shape)} != {tuple(self.prompts.shape)}")
        self.prompts = prompts

    def nbytes(self):
        return self.prompts.numel() * self.prompts.element_size()

    def plan(self, pb):
        """The batch's prompt width P (host) and each row's own prompt length (B,) on the device."""
        n = [self.host_len[s] if s >= 0 else 0 for s in pb.meta.host[self.key]]
        return {"P": max(n), "row_len": torch.tensor(n, dtype=torch.long).to(self.device)}

    def prompt(self, pb, x, mask):
        P = pb.plans[self.key]["P"]
        if P == 0:
            return x, mask
        return pb.op["prompt_prepend"](x, mask, self.prompts, self.lengths, pb.meta.slots[self.key], P)


class Prompt(Method):
    name, position = "prompt", 50
    bank = PromptBank
    paper = dict(num_virtual_tokens=20)
    peft_types = ("PROMPT_TUNING",)

    def check(self, mod, model, fail):
        p, D = mod.tensors.get("prompt"), model.cfg.d_model
        if p is None or p.dim() != 2 or p.shape[1] != D or p.shape[0] < 1:
            fail(f"needs 'prompt' of shape (P>=1, d_model={D}), got {None if p is None else tuple(p.shape)}")
        extra = [k for k in mod.tensors if k != "prompt" and not k.startswith("prompt_encoder.")]
        if extra:
            fail(f"unexpected tensors {extra}")

    def init(self, model, g, hp):
        """PEFT's RANDOM init: nn.Embedding's N(0, 1)."""
        P = hp["num_virtual_tokens"]
        return UserModule(self.name, {"prompt": torch.randn(P, model.cfg.d_model, generator=g)},
                          {"num_virtual_tokens": P})

    def from_peft(self, folder, cfg, w, model):
        p, n = w.get("prompt_embeddings"), fm.n_tokens(folder, cfg)
        if p is None or p.dim() != 2 or p.shape[0] < n:
            fm.bad(folder, f"needs prompt_embeddings with >= num_virtual_tokens={n} rows")
        return UserModule(self.name, {"prompt": p[:n].clone()}, {"num_virtual_tokens": n, "peft_type": cfg["peft_type"]})

    def needs(self, mod):
        return {"virtual_tokens": mod.tensors["prompt"].shape[0]}

    def served_tensors(self, mod):  # a P-tuning encoder is for training only
        return [t for k, t in mod.tensors.items() if not k.startswith("prompt_encoder.")]

    def peft_extra(self, mod, model) -> dict:
        return {"prompt_tuning_init": "RANDOM"}

    def to_peft(self, mod, model):
        p, c = mod.tensors["prompt"], model.cfg
        cfg = {**fm.peft_base_config(), "peft_type": self.peft_types[0], "num_virtual_tokens": p.shape[0],
               "token_dim": c.d_model, "num_transformer_submodules": 2, "num_attention_heads": c.num_heads,
               "num_layers": c.num_layers, **self.peft_extra(mod, model)}
        return cfg, {"prompt_embeddings": torch.cat([p, p], 0)}  # PEFT's seq2seq layout: the decoder half is unused


PROMPT = register(Prompt())
