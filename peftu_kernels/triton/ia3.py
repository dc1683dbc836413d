"""IA3 per-row scaling (Triton). Semantics (reference: ops/reference.py::ia3_scale):
    out[b, l, :] = x[b, l, :] * vec[s, :]  with s = slots[b] >= 0; rows with s < 0 copied unchanged.
Memory-bound: one program per (row, BLOCK_M tokens, BLOCK_D features), the row's vector loaded once."""
from __future__ import annotations

import triton
import triton.language as tl

from .lora import INTERPRET


@triton.jit
def _ia3_kernel(x_ptr, v_ptr, out_ptr, slot_ptr, S, L, D, stride_x_b, stride_x_l, stride_x_d, stride_v_s,
                stride_v_d, stride_o_b, stride_o_l, stride_o_d, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: rows past 2**31 elements must not wrap
    s = tl.load(slot_ptr + row).to(tl.int64)
    offs_m = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    msk = (offs_m[:, None] < L) & (offs_d[None, :] < D)
    x = tl.load(x_ptr + row * stride_x_b + offs_m[:, None] * stride_x_l + offs_d[None, :] * stride_x_d, mask=msk,
                other=0.0)
    if (s >= 0) & (s < S):
        v = tl.load(v_ptr + s * stride_v_s + offs_d * stride_v_d, mask=offs_d < D, other=1.0)
        x = (x.to(tl.float32) * v.to(tl.float32)[None, :]).to(x.dtype)
    tl.store(out_ptr + row * stride_o_b + offs_m[:, None] * stride_o_l + offs_d[None, :] * stride_o_d, x, mask=msk)


def ia3_into(out, x, vec, slots):
    Bn, L, D = x.shape
    if vec.dim() != 2 or vec.shape[1] != D or slots.shape != (Bn,) or out.shape != x.shape:
        raise ValueError(f"ia3_scale: vec {tuple(vec.shape)} must be (S, D={D}); slots {tuple(slots.shape)} (B={Bn},)")
    bm, bd = (16, 32) if INTERPRET else (16, 128)
    grid = (Bn, triton.cdiv(L, bm), triton.cdiv(D, bd))
    _ia3_kernel[grid](x, vec, out, slots.contiguous(), vec.shape[0], L, D, *x.stride(), *vec.stride(), *out.stride(), BLOCK_M=bm, BLOCK_D=bd,
                      num_warps=1 if INTERPRET else 4)
    return out
