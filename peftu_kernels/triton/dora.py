"""DoRA for mixed users (Triton). Semantics (reference: ops/dora.py::dora):
    out[b, l, n] = gain[s, n] * (y[b, l, n] + scale[s] * (x[b, l] @ A[s, :r_s].T) @ B[s, n, :r_s])   s = slots[b]
    rows with s < 0 (or s >= S) copy y. x (B, L, K), y/out (B, L, N); A (S, R, K), B (S, N, R); scale (S,) fp32;
    gain (S, N) = magnitude / column norm (the norm is per user, computed by ops/dora.py::dora_norm).
Inference: one fused launch, a program per (row, BLOCK_M tokens, BLOCK_N outputs): the rank-r intermediate of
its tokens stays in registers, LoRA add and gain are applied in the epilogue, so DoRA costs one pass over y like
LoRA (splitting N over the grid keeps decode-sized batches from leaving the card idle). Training: the Triton
LoRA and IA3 autograd ops composed (their backward kernels give dx, dA, dB and the gain's segmented sums).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops import dora as _reference  # noqa: F401  (the op's reference must be registered first)
from . import autograd as T
from .lora import INTERPRET, _block_r, _check, _cfg, _dot, _shrink_tile


@triton.jit
def _dora_kernel(x_ptr, a_ptr, b_ptr, y_ptr, out_ptr, gain_ptr, slot_ptr, rank_ptr, scale_ptr, S, L, K, N, R,
                 stride_x_b, stride_x_l, stride_x_k, stride_a_s, stride_a_r, stride_a_k,
                 stride_b_s, stride_b_n, stride_b_r, stride_y_b, stride_y_l, stride_y_n,
                 stride_o_b, stride_o_l, stride_o_n, stride_g_s, stride_g_n,
                 IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: rows past 2**31 elements must not wrap
    s = tl.load(slot_ptr + row).to(tl.int64)
    offs_m = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    ymask = (offs_m[:, None] < L) & (offs_n[None, :] < N)
    y = tl.load(y_ptr + row * stride_y_b + offs_m[:, None] * stride_y_l + offs_n[None, :] * stride_y_n, mask=ymask,
                other=0.0)
    z = y.to(tl.float32)
    if (s >= 0) & (s < S):
        r = tl.minimum(tl.load(rank_ptr + s), R)
        h = _shrink_tile(x_ptr + row * stride_x_b, a_ptr + s * stride_a_s, offs_m, r, L, K, stride_x_l, stride_x_k,
                         stride_a_r, stride_a_k, IEEE, BLOCK_M, BLOCK_R, BLOCK_K) * tl.load(scale_ptr + s)
        offs_r = tl.arange(0, BLOCK_R)
        w = tl.load(b_ptr + s * stride_b_s + offs_n[None, :] * stride_b_n + offs_r[:, None] * stride_b_r,
                    mask=(offs_n[None, :] < N) & (offs_r[:, None] < r), other=0.0)
        g = tl.load(gain_ptr + s * stride_g_s + offs_n * stride_g_n, mask=offs_n < N, other=1.0)
        z = (z + _dot(h, w.to(tl.float32), IEEE)) * g.to(tl.float32)[None, :]
    tl.store(out_ptr + row * stride_o_b + offs_m[:, None] * stride_o_l + offs_n[None, :] * stride_o_n,
             z.to(y.dtype), mask=ymask)


def dora_into(out, y, x, A, B, scale, gain, slots, rank=None) -> torch.Tensor:
    """Writes every element of `out` (B, L, N) (which may not alias y or x) and returns it."""
    _check(x, y, A, B, scale, slots)
    S, R, K = A.shape
    Bn, L, N = y.shape
    if gain.shape != (S, N) or out.shape != y.shape:
        raise ValueError(f"dora: gain {tuple(gain.shape)} must be (S={S}, N={N}) and out {tuple(out.shape)} like y")
    if rank is None:
        rank = torch.full((S,), R, dtype=torch.int64, device=x.device)
    slots, rank, scale = slots.contiguous(), rank.contiguous(), scale.float().contiguous()
    c = _cfg(L, R, "fused", x.dtype == torch.float32)
    grid = (Bn, triton.cdiv(L, c["BLOCK_M"]), triton.cdiv(N, c["BLOCK_N"]))
    _dora_kernel[grid](x, A, B, y, out, gain, slots, rank, scale, S, L, K, N, R, *x.stride(), *A.stride(),
                       *B.stride(), *y.stride(), *out.stride(), *gain.stride(), IEEE=x.dtype == torch.float32,
                       BLOCK_M=c["BLOCK_M"], BLOCK_R=_block_r(R), BLOCK_K=c["BLOCK_K"], BLOCK_N=c["BLOCK_N"],
                       num_warps=1 if INTERPRET else c["num_warps"])
    return out


def dora(y, x, A, B, scale, gain, slots, rank=None, seg=None):
    if T._needs_grad(y, x, A, B, gain):
        return T.ia3_scale(T.lora(y, x, A, B, scale, slots, rank, seg), gain, slots, seg)
    return dora_into(torch.empty_like(y), y, x, A, B, scale, gain, slots, rank)


OPS = {"dora": dora}
