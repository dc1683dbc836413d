"""The Triton ops behind the reference signatures, with autograd: backward runs on the same kernels
(row-gathered shrink/expand for input gradients, segmented reductions for each slot's weight gradients)."""
from __future__ import annotations

import torch

from .. import activations
from ..ops.segments import make_segments
from . import adapter as _ad
from . import ia3 as _ia3
from . import lora as _lo
from . import sgmv as _sgmv
from .seg import seg_outer, seg_rowsum


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts)


def _rank(rank, A):
    return rank if rank is not None else torch.full((A.shape[0],), A.shape[1], dtype=torch.int64, device=A.device)


class _Lora(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, x, A, B, scale, slots, rank, seg):
        ctx.save_for_backward(x, A, B, scale, slots, rank)
        ctx.seg = seg
        return _lo.lora_(y.clone(), x, A, B, scale, slots, rank)

    @staticmethod
    def backward(ctx, g):
        x, A, B, scale, slots, rank = ctx.saved_tensors
        seg, g = ctx.seg, g.contiguous()
        R = A.shape[1]
        gh = _lo.shrink(g, B.transpose(1, 2), slots, rank, scale, R=R)          # scale * g @ B[s]
        dx = dA = dB = None
        if ctx.needs_input_grad[1]:
            dx = _lo.expand_(torch.zeros_like(x), gh, A.transpose(1, 2), slots, rank)  # gh @ A[s]
        if ctx.needs_input_grad[2]:
            dA = seg_outer(gh, x, seg, torch.zeros_like(A, dtype=torch.float32)).to(A.dtype)
        if ctx.needs_input_grad[3]:
            h = _lo.shrink(x, A, slots, rank, scale)                              # scale * x @ A[s].T
            dB = seg_outer(g, h, seg, torch.zeros_like(B, dtype=torch.float32)).to(B.dtype)
        return g, dx, dA, dB, None, None, None, None


def lora(y, x, A, B, scale, slots, rank=None, seg=None):
    rank = _rank(rank, A)
    if _needs_grad(y, x, A, B):
        return _Lora.apply(y, x, A, B, scale, slots, rank, seg if seg is not None else make_segments(slots))
    if _sgmv.decode_shaped(x, seg):  # decode: grid sized to fill the card
        return _sgmv.lora_decode_(y, x, A, B, scale, slots, rank, seg)
    return _lo.lora_(y, x, A, B, scale, slots, rank)  # no gradient: accumulate into the caller's fresh y


class _Adapter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, residual, down, db, up, ub, act, slots, seg):
        ctx.save_for_backward(h, down, db, up, slots)
        ctx.act, ctx.seg, ctx.shapes = act, seg, (ub.shape, ub.dtype)
        return _ad.adapter_into(torch.empty_like(residual), h, residual, down, db, up, ub, act, slots)

    @staticmethod
    def backward(ctx, g):
        h, down, db, up, slots = ctx.saved_tensors
        seg, g = ctx.seg, g.contiguous()
        S, M, D = down.shape
        full = torch.full((S,), M, dtype=torch.int64, device=h.device)
        on = (slots >= 0).to(torch.float32)[:, None, None]
        pre = _lo.shrink(h, down, slots, full) + db.float()[slots.clamp(min=0)][:, None, :] * on
        with torch.enable_grad():
            p = pre.detach().requires_grad_(True)
            z = activations.fn(ctx.act)(p)
        dz = _lo.shrink(g, up.transpose(1, 2), slots, full, R=M)                  # g @ up[s]
        dpre = torch.autograd.grad(z, p, dz)[0] * on
        z = z.detach() * on
        dh = _lo.expand_(torch.zeros_like(h), dpre, down.transpose(1, 2), slots, full)
        f32 = dict(dtype=torch.float32, device=h.device)
        d_down = seg_outer(dpre, h, seg, torch.zeros(S, M, D, **f32)).to(down.dtype)
        d_db = seg_rowsum(dpre, seg, torch.zeros(S, M, **f32)).to(db.dtype)
        d_up = seg_outer(g, z, seg, torch.zeros(S, D, M, **f32)).to(up.dtype)
        d_ub = seg_rowsum(g, seg, torch.zeros(ctx.shapes[0], **f32)).to(ctx.shapes[1])
        return dh, g, d_down, d_db, d_up, d_ub, None, None, None


def adapter(h, residual, down, down_bias, up, up_bias, act, slots, seg=None):
    if _needs_grad(h, residual, down, down_bias, up, up_bias):
        return _Adapter.apply(h, residual, down, down_bias, up, up_bias, act, slots,
                              seg if seg is not None else make_segments(slots))
    if _sgmv.decode_shaped(h, seg):  # decode: split grid, SGMV tiles
        return _sgmv.adapter_decode(h, residual, down, down_bias, up, up_bias, act, slots, seg)
    return _ad.adapter_into(torch.empty_like(residual), h, residual, down, down_bias, up, up_bias, act, slots)


class _IA3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, vec, slots, seg):
        ctx.save_for_backward(x, vec, slots)
        ctx.seg = seg
        return _ia3.ia3_into(torch.empty_like(x), x, vec, slots)

    @staticmethod
    def backward(ctx, g):
        x, vec, slots = ctx.saved_tensors
        g = g.contiguous()
        dx = _ia3.ia3_into(torch.empty_like(g), g, vec, slots) if ctx.needs_input_grad[0] else None
        dv = None
        if ctx.needs_input_grad[1]:
            dv = seg_rowsum(g.float() * x.float(), ctx.seg, torch.zeros_like(vec, dtype=torch.float32)).to(vec.dtype)
        return dx, dv, None, None


def ia3_scale(x, vec, slots, seg=None):
    if _needs_grad(x, vec):
        return _IA3.apply(x, vec, slots, seg if seg is not None else make_segments(slots))
    return _ia3.ia3_into(torch.empty_like(x), x, vec, slots)


OPS = {"lora": lora, "adapter": adapter, "ia3_scale": ia3_scale}
