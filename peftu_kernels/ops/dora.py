"""DoRA ops (Liu et al. 2024, weight-decomposed LoRA), reference semantics; registered on import.

DoRA serves  W' = m * (W + s B A) / ||W + s B A||_row  per user, so that
    y[b] = gain[u] * (W x[b] + s (x[b] A[u]^T) B[u]^T),   gain[u] = m[u] / ||W + s B[u] A[u]||_row   (out,)
i.e. a LoRA add followed by a per-feature scale of the row's output. The norm is a per-user constant at
serving time (and detached in training, as the paper's section 4.3 and HF PEFT do), so it is computed once
per user and site, never per row, and never by materialising W + s B A:
    ||W_o + s (B A)_o||^2 = ||W_o||^2 + 2 s B_o . (W A^T)_o + s^2 B_o (A A^T) B_o^T
costs one (out, in) x (in, r) product per user instead of an (out, in) weight.
"""
from __future__ import annotations

import torch

from . import register
from .reference import ia3_scale, lora


def dora_norm(W, A, B, scale):
    """Row norms ||W + scale[u] * B[u] @ A[u]||_row -> (U, out) fp32, for the users' stacked A (U, r, in),
    B (U, out, r), scale (U,); W (out, in) is the base weight they share."""
    W, A, B = W.float(), A.float(), B.float()
    s = scale.float()[:, None]
    wa = torch.einsum("oi,uri->uor", W, A)                 # (U, out, r)
    gram = A @ A.transpose(1, 2)                           # (U, r, r)
    sq = W.pow(2).sum(1)[None] + 2 * s * (B * wa).sum(-1) + s.pow(2) * ((B @ gram) * B).sum(-1)
    return sq.clamp(min=0).sqrt()


def dora(y, x, A, B, scale, gain, slots, rank=None, seg=None):
    """Semantics: `gain[s] * (y[b] + scale[s] * (x[b] @ A[s].T) @ B[s].T)` with s = slots[b]; rows with s < 0
    unchanged. y is the base output W x (B, L, out); gain (S, out) = magnitude / column norm."""
    z = lora(y, x, A, B, scale, slots, rank, seg)
    if z is y:  # no row has a DoRA user: nothing to scale (and y is the caller's)
        return ia3_scale(z, gain, slots, seg)
    on = (slots >= 0)[:, None]
    g = torch.where(on, gain[slots.clamp(min=0)].to(z.dtype), torch.ones((), dtype=z.dtype, device=z.device))
    return z.mul_(g[:, None, :])  # in place on lora's fresh output: one allocation of (B, L, out) less


register("reference", {"dora": dora, "dora_norm": dora_norm})
