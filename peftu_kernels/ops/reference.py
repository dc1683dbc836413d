"""Plain-PyTorch references: they *define* each multi-tenant op and are the CPU path.

Shapes: activations are (B, L, D) with one user slot per row, `slots` (B,) long, -1 = no module for that
row. Banks stack every user's module along a slot dimension S. Accumulation is in fp32; results are cast
back to the activation dtype once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACT = {"relu": F.relu, "silu": F.silu, "swish": F.silu, "gelu": F.gelu, "tanh": torch.tanh,
       "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "sigmoid": torch.sigmoid, "identity": lambda x: x}


def _active(slots):
    """Rows that have a module: (index or None when all rows do, their slots)."""
    on = slots >= 0
    if bool(on.all()):
        return None, slots
    idx = on.nonzero().squeeze(1)
    return idx, slots[idx]


def _by_user(t, seg):
    """(U*k, L, D) -> (U, k*L, D): a view, when seg.group says the rows come k per user in slot order."""
    return t.reshape(seg.slot.numel(), -1, t.shape[-1])


def lora_shrink(x, A, scale, slots):
    """h[b] = scale[s] * x[b] @ A[s].T in fp32 -> (n_active, L, r); A (S, r, D_in). Scaling the narrow
    intermediate costs T*r instead of T*D_out."""
    return torch.bmm(x.float(), A[slots].float().transpose(1, 2)) * scale[slots].float()[:, None, None]


def lora_expand(y, h, B, rows, slots):
    """y[b] += h[b] @ B[s].T for the active rows; B (S, D_out, r). Returns a new tensor."""
    Bt = B[slots].float().transpose(1, 2)
    if rows is None:
        return torch.baddbmm(y.float(), h, Bt).to(y.dtype)  # one pass over y
    return y.index_add(0, rows, torch.bmm(h, Bt).to(y.dtype))


def lora(y, x, A, B, scale, slots, rank=None, seg=None):
    """Semantics: `y[b] + scale[s] * (x[b] @ A[s].T) @ B[s].T` where `s = slots[b]`, rows with s < 0 unchanged.
    Mixed ranks are zero-padded to A's r (exact: padded rows/cols contribute 0)."""
    rows, s = _active(slots)
    if s.numel() == 0:
        return y
    if rows is None and bool((s == s[0]).all()):  # one user for the whole batch: two plain matmuls, no gather
        u = int(s[0])
        h = (x.float() @ A[u].float().T) * scale[u].float()
        return torch.addmm(y.float().flatten(0, -2), h.flatten(0, -2), B[u].float().T).view(y.shape).to(y.dtype)
    if seg is not None and seg.group:  # rows grouped by user: one matmul per user, no per-row gather
        u = seg.slot
        h = torch.bmm(_by_user(x.float(), seg), A[u].float().transpose(1, 2)) * scale[u].float()[:, None, None]
        return torch.baddbmm(_by_user(y.float(), seg), h, B[u].float().transpose(1, 2)).view(y.shape).to(y.dtype)
    xs = x if rows is None else x[rows]
    return lora_expand(y, lora_shrink(xs, A, scale, s), B, rows, s)


def ia3_scale(x, vec, slots, seg=None):
    """Semantics: `x[b] * vec[s]` (per feature), rows with s < 0 unchanged; vec (S, D)."""
    v = torch.ones(slots.shape[0], x.shape[-1], dtype=x.dtype, device=x.device)
    on = slots >= 0
    v[on] = vec[slots[on]].to(x.dtype)
    return x * v[:, None, :]


def adapter(h, residual, down, down_bias, up, up_bias, act: str, slots, seg=None):
    """Bottleneck adapter. Semantics: `residual[b] + up[s] @ act(down[s] @ h[b] + down_bias[s]) + up_bias[s]`;
    rows with s < 0: residual unchanged. down (S, m, D), down_bias (S, m), up (S, D, m), up_bias (S, D)."""
    rows, s = _active(slots)
    if s.numel() == 0:
        return residual
    if seg is not None and seg.group:  # rows grouped by user: one matmul per user
        s, hs = seg.slot, _by_user(h.float(), seg)
    else:
        hs = (h if rows is None else h[rows]).float()
    z = ACT[act](torch.baddbmm(down_bias[s].float()[:, None, :], hs, down[s].float().transpose(1, 2)))
    d = torch.baddbmm(up_bias[s].float()[:, None, :], z, up[s].float().transpose(1, 2)).to(residual.dtype)
    if seg is not None and seg.group:
        return residual + d.view(residual.shape)
    return residual + d if rows is None else residual.index_add(0, rows, d)


def prompt_prepend(x, mask, prompts, lengths, slots):
    """Prompt tuning: row b gets its user's `lengths[s]` virtual tokens right before its input, left-padded
    (masked) to the batch's longest prompt. T5's bias is relative, so the padding changes nothing.
    x (B, L, D), mask (B, L) bool, prompts (S, Pmax, D) (user tokens right-aligned), lengths (S,)."""
    on = slots >= 0
    P = int(lengths[slots[on]].max()) if bool(on.any()) else 0
    if P == 0:
        return x, mask
    Pmax = prompts.shape[1]
    p = torch.zeros(x.shape[0], P, x.shape[-1], dtype=x.dtype, device=x.device)
    p[on] = prompts[slots[on], Pmax - P:].to(x.dtype)
    n = torch.where(on, lengths[slots.clamp(min=0)], 0)
    pmask = torch.arange(P, device=x.device)[None, :] >= (P - n)[:, None]
    return torch.cat([p, x], 1), torch.cat([pmask, mask], 1)


def prefix_gather(k_bank, v_bank, lengths, slots, P: int):
    """Prefix tuning: per-row prefix keys/values (B, H, P, dk), right-aligned, and their mask (B, P).
    Banks (S, H, Pmax, dk) with each user's tokens right-aligned; rows with s < 0 get an all-False mask."""
    on = slots >= 0
    Pmax = k_bank.shape[2]
    s = slots.clamp(min=0)
    k, v = k_bank[s, :, Pmax - P:], v_bank[s, :, Pmax - P:]
    n = torch.where(on, lengths[s], 0)
    mask = torch.arange(P, device=slots.device)[None, :] >= (P - n)[:, None]
    return k, v, mask
