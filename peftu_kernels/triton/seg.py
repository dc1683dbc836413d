"""Segmented reductions for weight gradients (Triton): deterministic, no atomics.

Semantics (rows sorted by slot into segments, see ops/segments.py):
    outer:  out[slot[g]] = sum over rows b of segment g, tokens l:  U[b, l, :P]^T @ V[b, l, :Q]     (P, Q)
    rowsum: out[slot[g]] = sum over rows b of segment g, tokens l:  U[b, l, :]                       (D,)
One program per (segment, output tile) walks its segment's rows in order, so the sum order is fixed.
Slots absent from the batch are left as they were (zeros for fresh gradients).
`seg_outer` with split > 1 cuts each segment's tokens into `split` chunks, one program each (a few users
with many tokens no longer leave the card idle); the partial tiles are summed in a fixed order afterwards,
so the result is the same every run (no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lora import INTERPRET, _dot


@triton.jit
def _seg_outer_kernel(u_ptr, v_ptr, out_ptr, order_ptr, starts_ptr, segslot_ptr, L, P, Q,
                      stride_u_b, stride_u_l, stride_u_p, stride_v_b, stride_v_l, stride_v_q,
                      stride_o_s, stride_o_p, stride_o_q, IEEE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    g = tl.program_id(0)
    s = tl.load(segslot_ptr + g)
    r0 = tl.load(starts_ptr + g)
    r1 = tl.load(starts_ptr + g + 1)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for i in range(r0, r1):
        row = tl.load(order_ptr + i).to(tl.int64)
        for m0 in range(0, L, BLOCK_M):
            offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
            ut = tl.load(u_ptr + row * stride_u_b + offs_p[:, None] * stride_u_p + offs_m[None, :] * stride_u_l,
                         mask=(offs_p[:, None] < P) & (offs_m[None, :] < L), other=0.0)
            vt = tl.load(v_ptr + row * stride_v_b + offs_m[:, None] * stride_v_l + offs_q[None, :] * stride_v_q,
                         mask=(offs_m[:, None] < L) & (offs_q[None, :] < Q), other=0.0)
            acc += _dot(ut.to(tl.float32), vt.to(tl.float32), IEEE)
    tl.store(out_ptr + s * stride_o_s + offs_p[:, None] * stride_o_p + offs_q[None, :] * stride_o_q,
             acc.to(out_ptr.dtype.element_ty), mask=(offs_p[:, None] < P) & (offs_q[None, :] < Q))


@triton.jit
def _seg_outer_split_kernel(u_ptr, v_ptr, part_ptr, order_ptr, starts_ptr, L, P, Q, SPLIT, NQ,
                            stride_u_b, stride_u_l, stride_u_p, stride_v_b, stride_v_l, stride_v_q,
                            stride_w_j, stride_w_g, stride_w_p, stride_w_q, IEEE: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    g = tl.program_id(0)
    j = tl.program_id(1)
    offs_p = (tl.program_id(2) // NQ) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = (tl.program_id(2) % NQ) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    r0 = tl.load(starts_ptr + g)
    n = (tl.load(starts_ptr + g + 1) - r0) * L  # the segment's tokens, flattened (row, token)
    c = (n + SPLIT - 1) // SPLIT
    t_lo = j * c
    t_hi = tl.minimum(n, t_lo + c)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for t0 in range(t_lo, t_hi, BLOCK_M):
        t = t0 + tl.arange(0, BLOCK_M)
        tm = t < t_hi
        rows = tl.load(order_ptr + r0 + t // L, mask=tm, other=0).to(tl.int64)
        ls = (t % L).to(tl.int64)
        ut = tl.load(u_ptr + rows[None, :] * stride_u_b + ls[None, :] * stride_u_l + offs_p[:, None] * stride_u_p,
                     mask=(offs_p[:, None] < P) & tm[None, :], other=0.0)
        vt = tl.load(v_ptr + rows[:, None] * stride_v_b + ls[:, None] * stride_v_l + offs_q[None, :] * stride_v_q,
                     mask=tm[:, None] & (offs_q[None, :] < Q), other=0.0)
        acc += _dot(ut.to(tl.float32), vt.to(tl.float32), IEEE)
    tl.store(part_ptr + j * stride_w_j + g * stride_w_g + offs_p[:, None] * stride_w_p + offs_q[None, :] * stride_w_q,
             acc, mask=(offs_p[:, None] < P) & (offs_q[None, :] < Q))


@triton.jit
def _seg_rowsum_kernel(u_ptr, out_ptr, order_ptr, starts_ptr, segslot_ptr, L, D,
                       stride_u_b, stride_u_l, stride_u_d, stride_o_s, stride_o_d,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    g = tl.program_id(0)
    s = tl.load(segslot_ptr + g)
    r0 = tl.load(starts_ptr + g)
    r1 = tl.load(starts_ptr + g + 1)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(r0, r1):
        row = tl.load(order_ptr + i).to(tl.int64)
        for m0 in range(0, L, BLOCK_M):
            offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
            u = tl.load(u_ptr + row * stride_u_b + offs_m[:, None] * stride_u_l + offs_d[None, :] * stride_u_d,
                        mask=(offs_m[:, None] < L) & (offs_d[None, :] < D), other=0.0)
            acc += tl.sum(u.to(tl.float32), axis=0)
    tl.store(out_ptr + s * stride_o_s + offs_d * stride_o_d, acc.to(out_ptr.dtype.element_ty), mask=offs_d < D)


def _blk(n: int, cap: int = 64) -> int:
    return 16 if INTERPRET else min(cap, max(16, triton.next_power_of_2(n)))


def _outer_cfg(P: int, Q: int):
    """(BLOCK_P, BLOCK_Q, BLOCK_M, num_warps): the (P, Q) accumulator and the (M, P), (M, Q) operand tiles
    within the register budget (configs.fit); one small config under the interpreter."""
    if INTERPRET:
        return 16, 16, 16, 1
    from .configs import fit
    b, w = fit({"P": _blk(P), "Q": _blk(Q), "M": 32}, [("P", "Q"), ("M", "P"), ("M", "Q")], ["M", "Q", "P"],
               ieee=True)  # fp32 operands and accumulators: weight gradients
    return b["P"], b["Q"], b["M"], w


def outer_split(n_seg: int, tokens: int, tiles: int, sms: int | None = None) -> int:
    """Chunks per segment: about two programs per SM, and at least 256 tokens per chunk."""
    if INTERPRET:
        return 1
    from .configs import sm_count
    want = triton.cdiv(2 * (sms or sm_count()), max(1, n_seg * tiles))
    return max(1, min(want, tokens // max(1, 256 * n_seg)))


def seg_outer(U, V, seg, out: torch.Tensor, split: int | None = None) -> torch.Tensor:
    """out[slot] = sum of U^T V over each segment's rows; U (B, L, P), V (B, L, Q), out (S, P, Q)."""
    n_seg = seg.slot.numel()
    if n_seg == 0:
        return out
    _, L, P = U.shape
    Q = V.shape[2]
    bp, bq, bm, warps = _outer_cfg(P, Q)
    tiles = triton.cdiv(P, bp) * triton.cdiv(Q, bq)
    if split is None:
        split = outer_split(n_seg, max(seg.n_active, 0) * L, tiles)
    if split > 1:
        part = torch.empty(split, n_seg, P, Q, device=U.device, dtype=torch.float32)  # every tile is stored
        _seg_outer_split_kernel[(n_seg, split, tiles)](U, V, part, seg.order, seg.starts, L, P, Q, split,
                                                       triton.cdiv(Q, bq), *U.stride(), *V.stride(), *part.stride(),
                                                       IEEE=True, BLOCK_M=bm, BLOCK_P=bp, BLOCK_Q=bq,
                                                       num_warps=warps)
        out[seg.slot] = part.sum(0).to(out.dtype)  # a fixed order: deterministic
        return out
    grid = (n_seg, triton.cdiv(P, bp), triton.cdiv(Q, bq))
    _seg_outer_kernel[grid](U, V, out, seg.order, seg.starts, seg.slot, L, P, Q, *U.stride(), *V.stride(),
                            *out.stride(), IEEE=True, BLOCK_M=bm, BLOCK_P=bp, BLOCK_Q=bq, num_warps=warps)
    return out


def seg_rowsum(U, seg, out: torch.Tensor) -> torch.Tensor:
    """out[slot] = sum over each segment's rows and tokens of U; U (B, L, D), out (S, D)."""
    n_seg = seg.slot.numel()
    if n_seg == 0:
        return out
    _, L, D = U.shape
    bd = _blk(D, 256)
    _seg_rowsum_kernel[(n_seg, triton.cdiv(D, bd))](U, out, seg.order, seg.starts, seg.slot, L, D, *U.stride(),
                                                    *out.stride(), BLOCK_M=16, BLOCK_D=bd,
                                                    num_warps=1 if INTERPRET else 4)
    return out
