"""Decode-shaped LoRA and bottleneck adapters for mixed users (Triton): one token per row, grid sized to
fill the card.

Semantics (reference: ops/reference.py::lora), for L = 1:
    y[b, 0] += scale[s] * (x[b, 0] @ A[s, :r_s].T) @ B[s, :, :r_s].T      s = slots[b] >= 0
Two launches over the batch's tiles (Segments.tile_rows: each user's rows in tiles of 16, built on the host
with BatchMeta):
  shrink  grid (tiles, split_k): a tile's rows times A[s] over one K-chunk -> partial h (split_k, B, R) fp32
  expand  grid (tiles, N / BLOCK_N): h summed over the chunks in a fixed order (deterministic), @ B[s] into y
SGMV (Punica, Chen et al. 2023): rows of one user share a tile, so A[s] and B[s] are read once per tile, not
once per row, and the tile is a tensor-core tl.dot. BGMV (all rows distinct): a program per row, a
multiply-reduce instead of a dot. Splitting K and N gives ~2 programs per SM where one program per row gave
8-64 (configs.decode_config). y is updated in place (the caller's fresh base output); h is never zero-filled
(rows a tile does not cover are never read). A bottleneck adapter is the same two launches: down = shrink,
then act(h + down_bias) @ up + up_bias in the expand (reference: ops/reference.py::adapter).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import activations
from .adapter import _act
from .configs import INTERPRET, decode_config, gpu_name
from .lora import _block_r, _check, _dot


@triton.jit
def _tile_rows(rows_ptr, t, BR: tl.constexpr):
    rows = tl.load(rows_ptr + t * BR + tl.arange(0, BR)).to(tl.int64)
    return rows, rows >= 0


@triton.jit
def _times_b(h, b_ptr, s, offs_n, offs_r, r, N, stride_b_s, stride_b_n, stride_b_r, IEEE: tl.constexpr,
             BR: tl.constexpr):
    """(BR, BLOCK_N) fp32 = h @ B[s, offs_n, :r].T: a tensor-core dot for a tile of rows, a reduce for one."""
    w = tl.load(b_ptr + s * stride_b_s + offs_n[None, :] * stride_b_n + offs_r[:, None] * stride_b_r,
                mask=(offs_n[None, :] < N) & (offs_r[:, None] < r), other=0.0).to(tl.float32)
    if BR >= 16:
        acc = _dot(h, w, IEEE)
    else:
        acc = tl.sum(h[:, :, None] * w[None, :, :], axis=1)
    return acc


@triton.jit
def _add_into(y_ptr, rows, valid, offs_n, N, stride_y_b, stride_y_n, acc):
    """y[rows, offs_n] += acc (in y's dtype, summed in fp32)."""
    ptrs = y_ptr + rows[:, None] * stride_y_b + offs_n[None, :] * stride_y_n
    ymask = valid[:, None] & (offs_n[None, :] < N)
    y = tl.load(ptrs, mask=ymask, other=0.0)
    tl.store(ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=ymask)


@triton.jit
def _sgmv_shrink_kernel(x_ptr, a_ptr, hp_ptr, rows_ptr, tslot_ptr, rank_ptr, scale_ptr, S, K, R, KCHUNK,
                        stride_x_b, stride_x_k, stride_a_s, stride_a_r, stride_a_k,
                        stride_hp_p, stride_hp_b, stride_hp_r,
                        IEEE: tl.constexpr, BR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                        HAS_SCALE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    s = tl.load(tslot_ptr + t).to(tl.int64)
    if (s < 0) | (s >= S):
        return
    r = tl.minimum(tl.load(rank_ptr + s), R)
    rows, valid = _tile_rows(rows_ptr, t, BR)
    offs_r = tl.arange(0, BLOCK_R)
    k_lo = p * KCHUNK
    k_hi = tl.minimum(k_lo + KCHUNK, K)
    acc = tl.zeros((BR, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + rows[:, None] * stride_x_b + kk[None, :] * stride_x_k,
                     mask=valid[:, None] & (kk[None, :] < k_hi), other=0.0)
        wt = tl.load(a_ptr + s * stride_a_s + offs_r[None, :] * stride_a_r + kk[:, None] * stride_a_k,
                     mask=(offs_r[None, :] < r) & (kk[:, None] < k_hi), other=0.0)
        if BR >= 16:
            acc += _dot(xt, wt.to(xt.dtype), IEEE)
        else:  # BGMV: a row's vector against the slot's rows of A
            acc += tl.sum(xt.to(tl.float32)[:, :, None] * wt.to(tl.float32)[None, :, :], axis=1)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + s).to(tl.float32)
    tl.store(hp_ptr + p * stride_hp_p + rows[:, None] * stride_hp_b + offs_r[None, :] * stride_hp_r, acc,
             mask=valid[:, None] & (offs_r[None, :] < R))


@triton.jit
def _sgmv_expand_kernel(hp_ptr, b_ptr, y_ptr, rows_ptr, tslot_ptr, rank_ptr, db_ptr, ub_ptr, S, N, R, SPLIT,
                        stride_hp_p, stride_hp_b, stride_hp_r, stride_b_s, stride_b_n, stride_b_r,
                        stride_y_b, stride_y_n, stride_db_s, stride_ub_s,
                        IEEE: tl.constexpr, BR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                        ADAPTER: tl.constexpr, ACT: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    s = tl.load(tslot_ptr + t).to(tl.int64)
    if (s < 0) | (s >= S):
        return
    r = tl.minimum(tl.load(rank_ptr + s), R)
    rows, valid = _tile_rows(rows_ptr, t, BR)
    offs_r = tl.arange(0, BLOCK_R)
    hmask = valid[:, None] & (offs_r[None, :] < r)
    h = tl.zeros((BR, BLOCK_R), dtype=tl.float32)
    for p in range(0, SPLIT):  # fixed order: the same sum every run
        h += tl.load(hp_ptr + p * stride_hp_p + rows[:, None] * stride_hp_b + offs_r[None, :] * stride_hp_r,
                     mask=hmask, other=0.0)
    if ADAPTER:  # bottleneck adapter: z = act(down h + down_bias); padded units meet zero columns of up
        db = tl.load(db_ptr + s * stride_db_s + offs_r, mask=offs_r < r, other=0.0).to(tl.float32)
        h = tl.where(hmask, _act(h + db[None, :], ACT), 0.0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _times_b(h, b_ptr, s, offs_n, offs_r, r, N, stride_b_s, stride_b_n, stride_b_r, IEEE, BR)
    if ADAPTER:
        acc += tl.load(ub_ptr + s * stride_ub_s + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    _add_into(y_ptr, rows, valid, offs_n, N, stride_y_b, stride_y_n, acc)


def _partials(split: int, rows: int, R: int, device) -> torch.Tensor:
    return torch.empty(split, rows, R, device=device, dtype=torch.float32)  # every element read is written first


def _tiles(seg, cfg):
    if cfg["grouped"]:
        return seg.tile_rows.contiguous(), seg.tile_slot.contiguous(), seg.tile_rows.shape[1]
    # BGMV: one program per active row
    return seg.order[:, None].contiguous(), seg.slot.repeat_interleave(seg.starts.diff(), output_size=seg.n_active), 1


def _config(x, A, N, seg, cfg):
    S, R, K = A.shape
    return cfg or decode_config(seg.n_active, int(seg.slot.numel()), K, N, R, gpu_name(x))


def shrink(x, A, scale, slots, rank, seg, cfg) -> torch.Tensor:
    """Partial h (split, B, R) fp32 of the active rows (others unwritten): sum over the first dim."""
    S, R, K = A.shape
    rows, tslot, BR = _tiles(seg, cfg)
    split = cfg["split_k"]
    kchunk = triton.cdiv(triton.cdiv(K, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    split = triton.cdiv(K, kchunk)
    hp = _partials(split, x.shape[0], R, x.device)
    x2 = x[:, 0]
    scale = scale.float().contiguous() if scale is not None else None
    _sgmv_shrink_kernel[(rows.shape[0], split)](
        x2, A, hp, rows, tslot, rank.contiguous(), scale if scale is not None else rank, S, K, R, kchunk, *x2.stride(),
        *A.stride(), *hp.stride(), IEEE=x.dtype == torch.float32, BR=BR, BLOCK_R=_block_r(R), BLOCK_K=cfg["BLOCK_K"],
        HAS_SCALE=scale is not None, num_warps=1 if INTERPRET else cfg["num_warps"])
    return hp


def expand_(y, hp, B, slots, rank, seg, cfg, adapter=None) -> torch.Tensor:
    """y (B, 1, N) += (sum over hp's first dim) @ B[s].T for the active rows, in place; adapter = (down_bias,
    up_bias, act) applies act(h + down_bias) first and adds up_bias."""
    S, N, R = B.shape
    rows, tslot, BR = _tiles(seg, cfg)
    y2 = y[:, 0]
    db, ub, act = adapter if adapter is not None else (rank, rank, "identity")
    _sgmv_expand_kernel[(rows.shape[0], triton.cdiv(N, cfg["BLOCK_N"]))](
        hp, B, y2, rows, tslot, rank.contiguous(), db, ub, S, N, R, hp.shape[0], *hp.stride(), *B.stride(),
        *y2.stride(), db.stride(0), ub.stride(0), IEEE=y.dtype == torch.float32, BR=BR, BLOCK_R=_block_r(R),
        BLOCK_N=cfg["BLOCK_N"], ADAPTER=adapter is not None, ACT=activations.code(act),
        num_warps=1 if INTERPRET else cfg["num_warps"])
    return y


def _launch(y, x, A, B, scale, slots, rank, seg, cfg, adapter=None):
    """shrink + expand over the batch's tiles; adapter = (down_bias, up_bias, act) for a bottleneck."""
    cfg = _config(x, A, y.shape[2], seg, cfg)
    return expand_(y, shrink(x, A, scale, slots, rank, seg, cfg), B, slots, rank, seg, cfg, adapter)


def decode_shaped(x, seg) -> bool:
    """One token per row and the batch's Segments with their row tiles: the shape these kernels serve."""
    return x.shape[1] == 1 and seg is not None and seg.tile_rows is not None


def _need_tiles(name, x, seg):
    if not decode_shaped(x, seg):
        raise ValueError(f"{name}: one token per row and the batch's Segments (with tiles) are needed, got "
                         f"L={x.shape[1]}, seg={'none' if seg is None else 'without tiles'}")


def lora_decode_(y, x, A, B, scale, slots, rank, seg, cfg: dict | None = None) -> torch.Tensor:
    """y (B, 1, N) += the rows' LoRA, in place; returns y. `seg` = the batch's Segments (with tiles)."""
    _check(x, y, A, B, scale, slots)
    _need_tiles("lora_decode_", x, seg)
    return y if seg.n_active == 0 else _launch(y, x, A, B, scale, slots, rank, seg, cfg)


def adapter_decode(h, residual, down, down_bias, up, up_bias, act: str, slots, seg, cfg: dict | None = None):
    """residual + up act(down h + down_bias) + up_bias per row (one token each), as a new tensor: the same
    tiles and split grid as LoRA (down = shrink, activation and biases in the expand's epilogue)."""
    _need_tiles("adapter_decode", h, seg)
    S, M, D = down.shape
    if up.shape != (S, D, M) or down_bias.shape != (S, M) or up_bias.shape != (S, D) or residual.shape != h.shape:
        raise ValueError(f"adapter_decode: down {tuple(down.shape)}, up {tuple(up.shape)}, biases "
                         f"{tuple(down_bias.shape)}/{tuple(up_bias.shape)}, residual {tuple(residual.shape)} do not fit "
                         f"h {tuple(h.shape)}")
    out = residual.clone()  # B x D: small next to the weights a decode step reads
    if seg.n_active == 0:
        return out
    full = torch.full((S,), M, dtype=torch.int64, device=h.device)
    return _launch(out, h, down, up, None, slots, full, seg, cfg, (down_bias.contiguous(), up_bias.contiguous(), act))
