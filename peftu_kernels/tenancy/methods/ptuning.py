"""P-tuning (Liu et al. 2021): a per-user prompt encoder (embedding -> MLP, or -> 2-layer bidirectional
LSTM -> MLP head, PEFT's layout) whose output is the prompt. Served as prompt tuning (its output prompt);
trained through its encoder, each user's its own.

Tensors: `prompt` (P, D) and `prompt_encoder.*` (training only; not counted as served parameters).
HF PEFT: P_TUNING (the saved output prompt).
"""
from __future__ import annotations

import torch
from torch import nn

from ..modules import UserModule
from . import register
from .base import TrainView
from .prompt import Prompt


class PromptEncoder(nn.Module):
    def __init__(self, n_tokens: int, d_model: int, hidden: int, kind: str = "MLP", generator=None):
        super().__init__()
        if kind not in ("MLP", "LSTM"):
            raise ValueError(f"P-tuning encoder type {kind!r}: use MLP or LSTM")
        self.kind = kind
        self.embedding = nn.Embedding(n_tokens, d_model)
        if kind == "MLP":
            self.mlp_head = nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, d_model))
        else:
            self.lstm_head = nn.LSTM(d_model, hidden, num_layers=2, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, d_model))
        if generator is not None:  # deterministic per user, independent of the global RNG
            with torch.no_grad():
                for p in self.parameters():
                    bound = 1.0 if p is self.embedding.weight else p.shape[-1] ** -0.5
                    p.copy_(torch.randn(p.shape, generator=generator) * bound if p is self.embedding.weight
                            else (torch.rand(p.shape, generator=generator) * 2 - 1) * bound)

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight[None]
        if self.kind == "LSTM":
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)[0]


def encoder_of(config: dict, d_model: int, generator=None) -> PromptEncoder:
    return PromptEncoder(config["num_virtual_tokens"], d_model, config["encoder_hidden_size"], config["encoder_type"],
                         generator)


class PTuningView(TrainView):
    """The parameters are each user's encoder weights (slot dim first); before a forward the encoders of
    the batch's users write their prompts into the bank, with the autograd graph back to the encoders."""

    def __init__(self, bank, slots, init):
        self.bank, self.slot, self.init = bank, slots, init
        first = next(iter(init.values()))
        dev = bank.device
        self.enc = encoder_of(first.config, first.tensors["prompt"].shape[1]).to(dev)
        shapes = dict(self.enc.named_parameters())
        self.enc_params = {k: torch.zeros(bank.slots, *p.shape, device=dev) for k, p in shapes.items()}
        with torch.no_grad():
            for u, s in slots.items():
                for k, t in self.enc_params.items():
                    t[s] = init[u].tensors[f"prompt_encoder.{k}"]
        self.params = [t.requires_grad_(True) for t in self.enc_params.values()]
        bank.prompts.requires_grad_(False)
        self._served = bank.prompts  # the bank's own storage: holds each user's latest prompt, detached

    def before_forward(self, users):
        from torch.func import functional_call
        slots = [self.slot[u] for u in users]
        out = torch.stack([functional_call(self.enc, {k: v[s] for k, v in self.enc_params.items()}, ())
                           for s in slots])
        idx = torch.tensor(slots, device=self.bank.device)
        base = self._served.detach()
        new = base.index_put((idx,), torch.nn.functional.pad(out, (0, 0, base.shape[1] - out.shape[1], 0)))
        with torch.no_grad():
            self._served[idx] = new[idx].detach()
        self.bank.use(new)

    def after_backward(self):
        pass

    def read(self, user):
        mod = self.bank.read(self.slot[user], self.init[user])
        for k, t in self.enc_params.items():
            mod.tensors[f"prompt_encoder.{k}"] = t.detach()[self.slot[user]].clone()
        return mod


class PTuning(Prompt):
    name, position = "ptuning", 70
    paper = dict(num_virtual_tokens=20, encoder_type="LSTM", encoder_hidden_size=128)
    peft_types = ("P_TUNING",)

    def bank_key(self, mod):
        return "prompt"  # served exactly as a prompt-tuning user

    def init(self, model, g, hp):
        cfg = {k: hp[k] for k in ("num_virtual_tokens", "encoder_type", "encoder_hidden_size")}
        enc = encoder_of(cfg, model.cfg.d_model, g)
        t = {f"prompt_encoder.{k}": v.detach().clone() for k, v in enc.state_dict().items()}
        with torch.no_grad():
            t["prompt"] = enc().detach()
        return UserModule(self.name, t, cfg)

    def peft_extra(self, mod, model):
        return {"encoder_reparameterization_type": mod.config.get("encoder_type", "MLP"),
                "encoder_hidden_size": mod.config.get("encoder_hidden_size", model.cfg.d_model)}

    def train_view(self, bank, slots, init):
        missing = [u for u, m in init.items() if not any(k.startswith("prompt_encoder.") for k in m.tensors)]
        if missing:
            raise ValueError(f"P-tuning users {missing[:5]} have no prompt_encoder tensors to train (an imported "
                             f"PEFT folder keeps only the output prompt; train it as prompt tuning)")
        return PTuningView(bank, slots, init)


PTUNING = register(PTuning())
