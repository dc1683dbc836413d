"""Batched-gather LoRA for mixed users (Triton).

Semantics (reference: ops/reference.py::lora):
    y[b, l] += scale[s] * (x[b, l] @ A[s, :r_s].T) @ B[s, :, :r_s].T      with s = slots[b] >= 0
x (B, L, K), y (B, L, N) fp32/fp16/bf16; A (S, R, K), B (S, N, R) in x's dtype; scale (S,) fp32; rank (S,)
int (each slot's true rank r_s <= R, masked so mixed ranks cost no padding traffic). Rows with s < 0 exit at
once. The rank-r intermediate is fp32; the scale is applied in expand; the result accumulates into y.

Layout: one program per (row, block of BLOCK_M tokens): for the encoder every row carries many tokens, so a
row is an SGMV segment (Punica's idea, Chen et al. 2023); for decoding (L = 1) the same kernels act as BGMV
(per-token gather). `fused=True` runs shrink and expand in one launch, keeping the (BLOCK_M, R) tile in
registers; it wins when R is small (the launcher picks it for R <= 32).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


TILES = {  # the live tiles of each kernel shape (configs.fit), "R" standing for BLOCK_R
    "shrink": [("BLOCK_M", "R"), ("BLOCK_M", "BLOCK_K"), ("R", "BLOCK_K")],
    "expand": [("BLOCK_M", "BLOCK_N"), ("BLOCK_M", "R"), ("R", "BLOCK_N")],
    "fused": [("BLOCK_M", "R"), ("BLOCK_M", "BLOCK_K"), ("R", "BLOCK_K"), ("BLOCK_M", "BLOCK_N"), ("R", "BLOCK_N")],
}


def _cfg(L: int, R: int, kind: str = "fused", ieee: bool = False):
    """Small heuristic: tokens per program from L, blocks within the register budget for `kind`'s tiles
    (configs.fit); one small config under the interpreter."""
    if INTERPRET:
        return dict(BLOCK_M=16, BLOCK_K=32, BLOCK_N=32, num_warps=1)
    from .configs import fit
    bm = 16 if L <= 16 else (32 if L <= 64 else 64)
    b, w = fit({"BLOCK_M": bm, "BLOCK_K": 64, "BLOCK_N": 64, "R": _block_r(R)}, TILES[kind],
               ["BLOCK_K", "BLOCK_N", "BLOCK_M"], ieee=ieee)
    return dict(BLOCK_M=b["BLOCK_M"], BLOCK_K=b["BLOCK_K"], BLOCK_N=b["BLOCK_N"], num_warps=w)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _shrink_tile(x_row, w_slot, offs_m, r, L, K, stride_x_l, stride_x_k, stride_w_r, stride_w_k,
                 IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_R) fp32 tile of x[m, :] @ W[:r, :].T; x_row / w_slot point at the row and the slot."""
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        xt = tl.load(x_row + offs_m[:, None] * stride_x_l + kk[None, :] * stride_x_k,
                     mask=(offs_m[:, None] < L) & (kk[None, :] < K), other=0.0)
        wt = tl.load(w_slot + offs_r[None, :] * stride_w_r + kk[:, None] * stride_w_k,
                     mask=(offs_r[None, :] < r) & (kk[:, None] < K), other=0.0)
        acc += _dot(xt, wt.to(xt.dtype), IEEE)
    return acc


@triton.jit
def _lora_shrink_kernel(x_ptr, w_ptr, h_ptr, slot_ptr, rank_ptr, scale_ptr, S, L, K, R,
                        stride_x_b, stride_x_l, stride_x_k, stride_w_s, stride_w_r, stride_w_k,
                        stride_h_b, stride_h_l, stride_h_r,
                        HAS_SCALE: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """h[b, m, :r] = (scale[s] *) x[b, m, :] @ W[s, :r, :].T   (fp32)."""
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: rows past 2**31 elements must not wrap
    s = tl.load(slot_ptr + row).to(tl.int64)
    if (s < 0) | (s >= S):
        return
    r = tl.minimum(tl.load(rank_ptr + s), R)
    offs_m = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    acc = _shrink_tile(x_ptr + row * stride_x_b, w_ptr + s * stride_w_s, offs_m, r, L, K, stride_x_l, stride_x_k,
                       stride_w_r, stride_w_k, IEEE, BLOCK_M, BLOCK_R, BLOCK_K)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + s).to(tl.float32)
    tl.store(h_ptr + row * stride_h_b + offs_m[:, None] * stride_h_l + offs_r[None, :] * stride_h_r, acc,
             mask=(offs_m[:, None] < L) & (offs_r[None, :] < R))


@triton.jit
def _lora_expand_kernel(h_ptr, w_ptr, y_ptr, slot_ptr, rank_ptr, scale_ptr, S, L, N, R,
                        stride_h_b, stride_h_l, stride_h_r, stride_w_s, stride_w_n, stride_w_r,
                        stride_y_b, stride_y_l, stride_y_n,
                        HAS_SCALE: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[b, m, n] += (scale[s] *) h[b, m, :r] @ W[s, n, :r].T   (h fp32, accumulate in fp32)."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.load(slot_ptr + row).to(tl.int64)
    if (s < 0) | (s >= S):
        return
    r = tl.minimum(tl.load(rank_ptr + s), R)
    offs_m = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    h = tl.load(h_ptr + row * stride_h_b + offs_m[:, None] * stride_h_l + offs_r[None, :] * stride_h_r,
                mask=(offs_m[:, None] < L) & (offs_r[None, :] < r), other=0.0)
    w = tl.load(w_ptr + s * stride_w_s + offs_n[None, :] * stride_w_n + offs_r[:, None] * stride_w_r,
                mask=(offs_n[None, :] < N) & (offs_r[:, None] < r), other=0.0)
    acc = _dot(h, w.to(tl.float32), IEEE)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + s).to(tl.float32)
    y_ptrs = y_ptr + row * stride_y_b + offs_m[:, None] * stride_y_l + offs_n[None, :] * stride_y_n
    ymask = (offs_m[:, None] < L) & (offs_n[None, :] < N)
    y = tl.load(y_ptrs, mask=ymask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=ymask)


@triton.jit
def _lora_fused_kernel(x_ptr, a_ptr, b_ptr, y_ptr, slot_ptr, rank_ptr, scale_ptr, S, L, K, N, R,
                       stride_x_b, stride_x_l, stride_x_k, stride_a_s, stride_a_r, stride_a_k,
                       stride_b_s, stride_b_n, stride_b_r, stride_y_b, stride_y_l, stride_y_n,
                       IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Shrink and expand in one program: the (BLOCK_M, R) intermediate never leaves registers."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.load(slot_ptr + row).to(tl.int64)
    if (s < 0) | (s >= S):
        return
    r = tl.minimum(tl.load(rank_ptr + s), R)
    sc = tl.load(scale_ptr + s).to(tl.float32)
    offs_m = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    h = _shrink_tile(x_ptr + row * stride_x_b, a_ptr + s * stride_a_s, offs_m, r, L, K, stride_x_l, stride_x_k,
                     stride_a_r, stride_a_k, IEEE, BLOCK_M, BLOCK_R, BLOCK_K) * sc
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        w = tl.load(b_ptr + s * stride_b_s + offs_n[None, :] * stride_b_n + offs_r[:, None] * stride_b_r,
                    mask=(offs_n[None, :] < N) & (offs_r[:, None] < r), other=0.0)
        acc = _dot(h, w.to(tl.float32), IEEE)
        y_ptrs = y_ptr + row * stride_y_b + offs_m[:, None] * stride_y_l + offs_n[None, :] * stride_y_n
        ymask = (offs_m[:, None] < L) & (offs_n[None, :] < N)
        y = tl.load(y_ptrs, mask=ymask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=ymask)


def _block_r(R: int) -> int:
    return max(16, triton.next_power_of_2(R))


def _check(x, y, A, B, scale, slots):
    if x.dim() != 3 or y.dim() != 3 or x.shape[:2] != y.shape[:2]:
        raise ValueError(f"lora: x {tuple(x.shape)} and y {tuple(y.shape)} must be (B, L, K) and (B, L, N)")
    if A.dim() != 3 or B.dim() != 3 or A.shape[2] != x.shape[2] or B.shape[1] != y.shape[2] or A.shape[1] != B.shape[2]:
        raise ValueError(f"lora: A {tuple(A.shape)} must be (S, R, K={x.shape[2]}) and B {tuple(B.shape)} "
                         f"(S, N={y.shape[2]}, R)")
    if slots.shape != (x.shape[0],) or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lora: slots must be int (B={x.shape[0]},), got {slots.dtype} {tuple(slots.shape)}")
    if scale.shape != (A.shape[0],):
        raise ValueError(f"lora: scale must be (S={A.shape[0]},), got {tuple(scale.shape)}")


def shrink(x, W, slots, rank, scale=None, R=None, zero: bool = True) -> torch.Tensor:
    """h (B, L, R) fp32 = (scale *) x @ W[s, :r].T, with W addressed as (S, R, K) through its strides.
    Rows without a slot are zeros, or (zero=False, for a caller that never reads them) left unwritten."""
    Bn, L, K = x.shape
    R = W.shape[1] if R is None else R
    slots, rank = slots.contiguous(), rank.contiguous()
    scale = scale.contiguous() if scale is not None else None
    h = (torch.zeros if zero else torch.empty)(Bn, L, R, device=x.device, dtype=torch.float32)
    c = _cfg(L, R, "shrink", x.dtype == torch.float32)
    grid = (Bn, triton.cdiv(L, c["BLOCK_M"]))
    _lora_shrink_kernel[grid](x, W, h, slots, rank, scale if scale is not None else rank, W.shape[0], L, K, R,
                              *x.stride(), *W.stride(), *h.stride(), HAS_SCALE=scale is not None,
                              IEEE=x.dtype == torch.float32, BLOCK_M=c["BLOCK_M"], BLOCK_R=_block_r(R),
                              BLOCK_K=c["BLOCK_K"], num_warps=c["num_warps"])
    return h


def expand_(y, h, W, slots, rank, scale=None) -> torch.Tensor:
    """y += (scale *) h @ W[s, :, :r].T in place, W addressed as (S, N, R) through its strides."""
    Bn, L, N = y.shape
    slots, rank = slots.contiguous(), rank.contiguous()
    scale = scale.contiguous() if scale is not None else None
    c = _cfg(L, h.shape[2], "expand", y.dtype == torch.float32)
    grid = (Bn, triton.cdiv(L, c["BLOCK_M"]), triton.cdiv(N, c["BLOCK_N"]))
    _lora_expand_kernel[grid](h, W, y, slots, rank, scale if scale is not None else rank, W.shape[0], L, N,
                              h.shape[2],
                              *h.stride(), *W.stride(), *y.stride(), HAS_SCALE=scale is not None,
                              IEEE=y.dtype == torch.float32, BLOCK_M=c["BLOCK_M"], BLOCK_R=_block_r(h.shape[2]),
                              BLOCK_N=c["BLOCK_N"], num_warps=c["num_warps"])
    return y


def lora_(y, x, A, B, scale, slots, rank=None, fused: bool | None = None) -> torch.Tensor:
    """Writes into y (in place) and returns it. rank: each slot's true rank (default: A's full R)."""
    _check(x, y, A, B, scale, slots)
    S, R, K = A.shape
    if rank is None:
        rank = torch.full((S,), R, dtype=torch.int64, device=x.device)
    slots, rank, scale = slots.contiguous(), rank.contiguous(), scale.contiguous()  # read with stride 1
    if fused is None:
        fused = R <= 32
    if not fused:
        return expand_(y, shrink(x, A, slots, rank, zero=False), B, slots, rank, scale)  # expand skips those rows
    Bn, L, N = y.shape
    c = _cfg(L, R, "fused", x.dtype == torch.float32)
    grid = (Bn, triton.cdiv(L, c["BLOCK_M"]))
    _lora_fused_kernel[grid](x, A, B, y, slots, rank, scale, S, L, K, N, R, *x.stride(), *A.stride(), *B.stride(),
                             *y.stride(), IEEE=x.dtype == torch.float32, BLOCK_M=c["BLOCK_M"],
                             BLOCK_R=_block_r(R), BLOCK_K=c["BLOCK_K"], BLOCK_N=c["BLOCK_N"],
                             num_warps=c["num_warps"])
    return y
