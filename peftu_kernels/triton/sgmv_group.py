"""The expands of LoRA sites that share an input (q, k, v) in one launch, at one token per row (Triton).

Semantics (reference: ops/reference.py::lora_expand_group): for each site j,
    y_j[b, 0] += h[b, 0, off_j : off_j + R_j] @ B_j[s, :, :r_j(s)].T      s = slots[b] >= 0
h (B, 1, sum R_j) fp32 from one lora_shrink on the sites' stacked A's. Grid (tiles, N blocks of every site):
a program finds its site from its N-block index and reads that site's pointers, so a decode step's q, k and v
LoRA cost two launches (shrink + this) instead of six. Rows of a tile are one user's (sgmv.py's tiles).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import INTERPRET, decode_config, gpu_name
from .lora import _block_r
from .sgmv import _add_into, _tile_rows, _tiles, _times_b, decode_shaped


@triton.jit
def _site_expand(h_ptr, b_ptr, y_ptr, rank_ptr, rows, valid, s, nb, N, R, OFF, stride_h_b, stride_h_r,
                 stride_b_s, stride_b_n, stride_b_r, stride_y_b, stride_y_n,
                 IEEE: tl.constexpr, BR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    r = tl.minimum(tl.load(rank_ptr + s), R)
    offs_r = tl.arange(0, BLOCK_R)
    h = tl.load(h_ptr + rows[:, None] * stride_h_b + (OFF + offs_r)[None, :] * stride_h_r,
                mask=valid[:, None] & (offs_r[None, :] < r), other=0.0)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _times_b(h, b_ptr, s, offs_n, offs_r, r, N, stride_b_s, stride_b_n, stride_b_r, IEEE, BR)
    _add_into(y_ptr, rows, valid, offs_n, N, stride_y_b, stride_y_n, acc)


@triton.jit
def _expand_group_kernel(h_ptr, b0, b1, b2, y0, y1, y2, rk0, rk1, rk2, rows_ptr, tslot_ptr, S,
                         N0, N1, N2, R0, R1, R2, OFF1, OFF2, NB0, NB1, stride_h_b, stride_h_r,
                         sb0_s, sb0_n, sb0_r, sb1_s, sb1_n, sb1_r, sb2_s, sb2_n, sb2_r,
                         sy0_b, sy0_n, sy1_b, sy1_n, sy2_b, sy2_n,
                         IEEE: tl.constexpr, BR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    q = tl.program_id(1)
    s = tl.load(tslot_ptr + t).to(tl.int64)
    if (s < 0) | (s >= S):
        return
    rows, valid = _tile_rows(rows_ptr, t, BR)
    if q < NB0:
        _site_expand(h_ptr, b0, y0, rk0, rows, valid, s, q, N0, R0, 0, stride_h_b, stride_h_r, sb0_s, sb0_n, sb0_r,
                     sy0_b, sy0_n, IEEE, BR, BLOCK_R, BLOCK_N)
    elif q < NB0 + NB1:
        _site_expand(h_ptr, b1, y1, rk1, rows, valid, s, q - NB0, N1, R1, OFF1, stride_h_b, stride_h_r, sb1_s, sb1_n,
                     sb1_r, sy1_b, sy1_n, IEEE, BR, BLOCK_R, BLOCK_N)
    else:
        _site_expand(h_ptr, b2, y2, rk2, rows, valid, s, q - NB0 - NB1, N2, R2, OFF2, stride_h_b, stride_h_r, sb2_s,
                     sb2_n, sb2_r, sy2_b, sy2_n, IEEE, BR, BLOCK_R, BLOCK_N)


def lora_expand_group(ys, h, Bs, offsets, slots, ranks, seg=None):
    """ys[j] (B, L, N_j) += h[..., offsets[j]:offsets[j] + R_j] @ Bs[j][s].T; returns the ys (updated in place
    at one token per row with two or three sites, else through lora_expand site by site)."""
    from .lora_split import lora_expand
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (h, *ys, *Bs))
    if grad or not 2 <= len(ys) <= 3 or not decode_shaped(ys[0], seg):
        return [lora_expand(y, h[..., o:o + B.shape[2]], B, slots, rank=r, seg=seg)
                for y, B, o, r in zip(ys, Bs, offsets, ranks)]
    if seg.n_active == 0:
        return list(ys)
    n = len(ys)
    ys3, Bs3, rk3, off3 = list(ys) + [ys[0]] * (3 - n), list(Bs) + [Bs[0]] * (3 - n), list(ranks) + [ranks[0]] * (3 - n), \
        list(offsets) + [0] * (3 - n)
    R = max(B.shape[2] for B in Bs)
    cfg = decode_config(seg.n_active, int(seg.slot.numel()), h.shape[2], max(B.shape[1] for B in Bs), R, gpu_name(h))
    rows, tslot, BR = _tiles(seg, cfg)
    bn = cfg["BLOCK_N"]
    nbs = [triton.cdiv(B.shape[1], bn) for B in Bs3[:n]] + [0] * (3 - n)
    h2 = h[:, 0]
    y2 = [y[:, 0] for y in ys3]
    strides_b = [x for B in Bs3 for x in B.stride()]
    strides_y = [x for y in y2 for x in y.stride()]
    _expand_group_kernel[(rows.shape[0], sum(nbs))](
        h2, *Bs3, *y2, *(r.contiguous() for r in rk3), rows, tslot, Bs[0].shape[0], *(B.shape[1] for B in Bs3),
        *(B.shape[2] for B in Bs3), off3[1], off3[2], nbs[0], nbs[1], *h2.stride(), *strides_b, *strides_y,
        IEEE=ys[0].dtype == torch.float32, BR=BR, BLOCK_R=_block_r(R), BLOCK_N=bn,
        num_warps=1 if INTERPRET else cfg["num_warps"])
    return list(ys)


OPS = {"lora_expand_group": lora_expand_group}
