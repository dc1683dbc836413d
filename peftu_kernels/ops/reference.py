"""Plain-PyTorch references: they *define* each multi-tenant op and are the CPU path.

Shapes: activations are (B, L, D) with one user slot per row, `slots` (B,) long, -1 = no module for that
row. Banks stack every user's module along a slot dimension S. Accumulation is in fp32; results are cast
back to the activation dtype once. With `seg` (the batch's Segments, built once on the host) the ops make no
host sync; without it they find the active rows themselves. Arguments: an op never changes one, except the one
`ops.CONSUMES` names for it (lora's y, ...), whose storage any backend may use for the result; callers do not
read that argument again.
"""
from __future__ import annotations

import torch

from .. import activations


def _active(slots, seg=None):
    """Rows that have a module: (index or None when all rows do, their slots, the single slot or -1)."""
    if seg is not None and seg.n_active >= 0:
        rows, single = seg.rows, seg.single
    else:
        on = slots >= 0
        rows = None if bool(on.all()) else on.nonzero().squeeze(1)
        s = slots if rows is None else slots[rows]
        single = int(s[0]) if rows is None and bool((s == s[0]).all()) else -1
    return rows, (slots if rows is None else slots[rows]), single


def _none_active(rows, seg) -> bool:
    return rows is not None and (seg.n_active == 0 if seg is not None and seg.n_active >= 0 else rows.numel() == 0)


def _by_user(t, seg):
    """(U*k, L, D) -> (U, k*L, D): a view, when seg.group says the rows come k per user in slot order."""
    return t.reshape(seg.slot.numel(), -1, t.shape[-1])


def _shrink_rows(x, A, scale, slots):
    """h[b] = scale[s] * x[b] @ A[s].T in fp32 -> (n_active, L, r); A (S, r, D_in). Scaling the narrow
    intermediate costs T*r instead of T*D_out. scale None: 1."""
    h = torch.bmm(x.float(), A[slots].float().transpose(1, 2))
    return h if scale is None else h * scale[slots].float()[:, None, None]


def _expand_rows(y, h, B, rows, slots):
    """y[b] += h[b] @ B[s].T for the active rows; B (S, D_out, r). Returns a new tensor."""
    Bt = B[slots].float().transpose(1, 2)
    if rows is None:
        return torch.baddbmm(y.float(), h, Bt).to(y.dtype)  # one pass over y
    return y.index_add(0, rows, torch.bmm(h, Bt).to(y.dtype))


def lora_shrink(x, A, scale, slots, rank=None, seg=None):
    """LoRA's first half. Semantics: `h[b] = scale[s] * x[b] @ A[s].T` (B, L, R) fp32 (scale None: 1); rows with
    s < 0 are not defined (lora_expand never reads them; here zeros). Sites that share an input (q, k, v) run
    it once on their A's stacked along R."""
    rows, s, u = _active(slots, seg)
    if u >= 0:  # one user: a plain matmul
        h = x.float() @ A[u].float().T
        return h if scale is None else h * scale[u].float()
    if seg is not None and seg.group:  # k rows per user in slot order: one matmul per user
        h = torch.bmm(_by_user(x.float(), seg), A[seg.slot].float().transpose(1, 2))
        h = h if scale is None else h * scale[seg.slot].float()[:, None, None]
        return h.view(*x.shape[:2], A.shape[1])
    h = torch.zeros(*x.shape[:2], A.shape[1], dtype=torch.float32, device=x.device)
    if _none_active(rows, seg):
        return h
    hs = _shrink_rows(x if rows is None else x[rows], A, scale, s)
    return hs if rows is None else h.index_copy(0, rows, hs)


def lora_expand(y, h, B, slots, rank=None, seg=None):
    """LoRA's second half. Semantics: `y[b] + h[b] @ B[s].T` (h fp32 from lora_shrink, B (S, N, R)); rows with
    s < 0 unchanged."""
    rows, s, u = _active(slots, seg)
    if _none_active(rows, seg):
        return y
    if u >= 0:
        return torch.addmm(y.float().flatten(0, -2), h.flatten(0, -2), B[u].float().T).view(y.shape).to(y.dtype)
    if seg is not None and seg.group:
        out = torch.baddbmm(_by_user(y.float(), seg), _by_user(h, seg), B[seg.slot].float().transpose(1, 2))
        return out.view(y.shape).to(y.dtype)
    return _expand_rows(y, h if rows is None else h[rows], B, rows, s)


def lora(y, x, A, B, scale, slots, rank=None, seg=None):
    """Semantics: `y[b] + scale[s] * (x[b] @ A[s].T) @ B[s].T` where `s = slots[b]`, rows with s < 0 unchanged.
    Mixed ranks are zero-padded to A's r (exact: padded rows/cols contribute 0). One user for the whole batch:
    two plain matmuls, no gather; rows k per user in slot order: one matmul per user (lora_shrink's paths)."""
    return lora_expand(y, lora_shrink(x, A, scale, slots, rank, seg), B, slots, rank, seg)


def ia3_scale(x, vec, slots, seg=None):
    """Semantics: `x[b] * vec[s]` (per feature), rows with s < 0 unchanged; vec (S, D)."""
    on = (slots >= 0)[:, None]
    v = torch.where(on, vec[slots.clamp(min=0)].to(x.dtype), torch.ones((), dtype=x.dtype, device=x.device))
    return x * v[:, None, :]


def adapter(h, residual, down, down_bias, up, up_bias, act: str, slots, seg=None):
    """Bottleneck adapter. Semantics: `residual[b] + up[s] @ act(down[s] @ h[b] + down_bias[s]) + up_bias[s]`;
    rows with s < 0: residual unchanged. down (S, m, D), down_bias (S, m), up (S, D, m), up_bias (S, D)."""
    rows, s, _ = _active(slots, seg)
    if _none_active(rows, seg):
        return residual
    if seg is not None and seg.group:  # rows grouped by user: one matmul per user
        s, hs = seg.slot, _by_user(h.float(), seg)
    else:
        hs = (h if rows is None else h[rows]).float()
    z = activations.fn(act)(torch.baddbmm(down_bias[s].float()[:, None, :], hs, down[s].float().transpose(1, 2)))
    d = torch.baddbmm(up_bias[s].float()[:, None, :], z, up[s].float().transpose(1, 2)).to(residual.dtype)
    if seg is not None and seg.group:
        return residual + d.view(residual.shape)
    return residual + d if rows is None else residual.index_add(0, rows, d)


def prompt_prepend(x, mask, prompts, lengths, slots, P: int | None = None):
    """Prompt tuning: row b gets its user's `lengths[s]` virtual tokens right before its input, left-padded
    (masked) to the batch's longest prompt `P` (found with a host sync when not given). T5's bias is relative,
    so the padding changes nothing. x (B, L, D), mask (B, L) bool, prompts (S, Pmax, D) (user tokens
    right-aligned), lengths (S,)."""
    on = slots >= 0
    s = slots.clamp(min=0)
    n = torch.where(on, lengths[s], 0)
    if P is None:
        P = int(n.max())
    if P == 0:
        return x, mask
    p = torch.where(on[:, None, None], prompts[s, prompts.shape[1] - P:].to(x.dtype), torch.zeros((), dtype=x.dtype))
    pmask = torch.arange(P, device=x.device)[None, :] >= (P - n)[:, None]
    return torch.cat([p, x], 1), torch.cat([pmask, mask], 1)


def prefix_gather(k_bank, v_bank, slots, P: int):
    """Prefix tuning: per-row prefix keys/values (B, H, P, dk), the last P of each slot's right-aligned tokens.
    Banks (S, H, Pmax, dk); rows with s < 0 read slot 0 (the caller's mask hides every such column)."""
    s = slots.clamp(min=0)
    Pmax = k_bank.shape[2]
    return k_bank[s, :, Pmax - P:], v_bank[s, :, Pmax - P:]


def lora_expand_group(ys, h, Bs, offsets, slots, ranks, seg=None):
    """The expands of sites that share an input. Semantics: for each site j, `lora_expand(ys[j],
    h[..., offsets[j]:offsets[j] + R_j], Bs[j], slots, ranks[j])` (h from one lora_shrink on the stacked A's)."""
    # each slice made contiguous: a strided h sends CPU batched matmuls down a much slower path
    return [lora_expand(y, h[..., o:o + B.shape[2]].contiguous(), B, slots, r, seg)
            for y, B, o, r in zip(ys, Bs, offsets, ranks)]
