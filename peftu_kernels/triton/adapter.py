"""Fused bottleneck adapter per row's slot (Triton).

Semantics (reference: ops/reference.py::adapter):
    out[b] = residual[b] + up[s] @ act(down[s] @ h[b] + down_bias[s]) + up_bias[s]     with s = slots[b] >= 0
h, residual (B, L, D); down (S, M, D), down_bias (S, M), up (S, D, M), up_bias (S, D). Rows with s < 0 keep
the residual. Down-projection, activation, up-projection and residual add in one program per
(row, BLOCK_M tokens); the (BLOCK_M, M) bottleneck tile stays in registers (Houlsby et al. 2019 adapters,
served Punica-style per row). `out` may alias `residual` (each program reads all of h before it writes).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import activations
from .lora import INTERPRET, _block_r, _dot



@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = z * tl.sigmoid(z)
    elif ACT == 3:
        z = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 4:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        z = 0.5 * z * (1.0 + (2.0 * tl.sigmoid(2.0 * u) - 1.0))
    elif ACT == 5:
        z = 2.0 * tl.sigmoid(2.0 * z) - 1.0
    elif ACT == 6:
        z = tl.sigmoid(z)
    return z


@triton.jit
def _adapter_kernel(h_ptr, res_ptr, out_ptr, down_ptr, db_ptr, up_ptr, ub_ptr, slot_ptr, S, L, D, M,
                    stride_h_b, stride_h_l, stride_h_d, stride_r_b, stride_r_l, stride_r_d,
                    stride_o_b, stride_o_l, stride_o_d, stride_dn_s, stride_dn_m, stride_dn_d,
                    stride_db_s, stride_up_s, stride_up_d, stride_up_m, stride_ub_s,
                    ACT: tl.constexpr, COPY: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: rows past 2**31 elements must not wrap
    s = tl.load(slot_ptr + row).to(tl.int64)
    offs_m = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_b = tl.arange(0, BLOCK_B)
    if (s < 0) | (s >= S):  # no adapter: out = residual (a copy only when out is a separate tensor)
        if COPY:
            for n0 in range(0, D, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                msk = (offs_m[:, None] < L) & (offs_n[None, :] < D)
                r = tl.load(res_ptr + row * stride_r_b + offs_m[:, None] * stride_r_l + offs_n[None, :] * stride_r_d,
                            mask=msk, other=0.0)
                tl.store(out_ptr + row * stride_o_b + offs_m[:, None] * stride_o_l + offs_n[None, :] * stride_o_d,
                         r, mask=msk)
        return
    z = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        ht = tl.load(h_ptr + row * stride_h_b + offs_m[:, None] * stride_h_l + kk[None, :] * stride_h_d,
                     mask=(offs_m[:, None] < L) & (kk[None, :] < D), other=0.0)
        dt = tl.load(down_ptr + s * stride_dn_s + offs_b[None, :] * stride_dn_m + kk[:, None] * stride_dn_d,
                     mask=(offs_b[None, :] < M) & (kk[:, None] < D), other=0.0)
        z += _dot(ht, dt.to(ht.dtype), IEEE)
    z += tl.load(db_ptr + s * stride_db_s + offs_b, mask=offs_b < M, other=0.0).to(tl.float32)[None, :]
    z = _act(z, ACT)
    z = tl.where(offs_b[None, :] < M, z, 0.0)  # padded bottleneck columns contribute nothing
    for n0 in range(0, D, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        ut = tl.load(up_ptr + s * stride_up_s + offs_n[None, :] * stride_up_d + offs_b[:, None] * stride_up_m,
                     mask=(offs_n[None, :] < D) & (offs_b[:, None] < M), other=0.0)
        acc = _dot(z, ut.to(tl.float32), IEEE)
        acc += tl.load(ub_ptr + s * stride_ub_s + offs_n, mask=offs_n < D, other=0.0).to(tl.float32)[None, :]
        msk = (offs_m[:, None] < L) & (offs_n[None, :] < D)
        r = tl.load(res_ptr + row * stride_r_b + offs_m[:, None] * stride_r_l + offs_n[None, :] * stride_r_d,
                    mask=msk, other=0.0)
        tl.store(out_ptr + row * stride_o_b + offs_m[:, None] * stride_o_l + offs_n[None, :] * stride_o_d,
                 (r.to(tl.float32) + acc).to(r.dtype), mask=msk)


def adapter_into(out, h, residual, down, down_bias, up, up_bias, act: str, slots):
    """Writes residual + A(h) into `out` (which may be `residual` itself) and returns it."""
    if not activations.known(act):
        raise ValueError(f"adapter: activation {act!r} has no Triton kernel; known: {sorted(activations.NAMES)}")
    Bn, L, D = h.shape
    S, M, D2 = down.shape
    if D2 != D or up.shape != (S, D, M) or down_bias.shape != (S, M) or up_bias.shape != (S, D):
        raise ValueError(f"adapter: down {tuple(down.shape)}, up {tuple(up.shape)}, biases {tuple(down_bias.shape)}/"
                         f"{tuple(up_bias.shape)} do not fit h (B, L, D={D})")
    if residual.shape != h.shape or out.shape != h.shape or slots.shape != (Bn,):
        raise ValueError(f"adapter: residual {tuple(residual.shape)}, out {tuple(out.shape)} and slots "
                         f"{tuple(slots.shape)} must match h {tuple(h.shape)} / (B,)")
    c = dict(BLOCK_M=16, BLOCK_K=32, BLOCK_N=32) if INTERPRET else dict(BLOCK_M=16 if L <= 16 else 32, BLOCK_K=64,
                                                                        BLOCK_N=64)
    warps = 1
    if not INTERPRET:  # the down tile (M, B), its operands and the up tile (M, N) within the register budget
        from .configs import fit
        c, warps = fit({**c, "B": _block_r(M)}, [("BLOCK_M", "B"), ("BLOCK_M", "BLOCK_K"), ("B", "BLOCK_K"),
                                                ("BLOCK_M", "BLOCK_N"), ("B", "BLOCK_N")], ["BLOCK_K", "BLOCK_N", "BLOCK_M"],
                       ieee=h.dtype == torch.float32)
    bm = c["BLOCK_M"]
    grid = (Bn, triton.cdiv(L, bm))
    slots, down_bias, up_bias = slots.contiguous(), down_bias.contiguous(), up_bias.contiguous()  # stride-1 reads
    _adapter_kernel[grid](h, residual, out, down, down_bias, up, up_bias, slots, S, L, D, M, *h.stride(),
                          *residual.stride(), *out.stride(), *down.stride(), down_bias.stride(0), *up.stride(),
                          up_bias.stride(0), ACT=activations.code(act), COPY=out.data_ptr() != residual.data_ptr(),
                          IEEE=h.dtype == torch.float32,
                          BLOCK_M=bm, BLOCK_B=_block_r(M), BLOCK_K=c["BLOCK_K"], BLOCK_N=c["BLOCK_N"],
                          num_warps=warps)
    return out
