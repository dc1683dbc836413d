"""P-tuning's prompt encoder (PEFT's layout): embedding -> MLP, or -> 2-layer bidirectional LSTM -> MLP head.
Used in training only; a served P-tuning user is the prompt it outputs."""
from __future__ import annotations

import torch
from torch import nn


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
