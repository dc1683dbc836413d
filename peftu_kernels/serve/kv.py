"""The KV pool of the serving engine: preallocated once, one row per active request, never reallocated.

Per decoder layer: self-attention keys/values (rows, H, self_len, d_kv) -- a row's decoder prefix (if its user
has one) at the front, then one position per generated token -- and cross-attention keys/values
(rows, H, cross_len, d_kv) -- its cross prefix (AdapterHub), then its encoder output. Per row: which
self-attention keys exist (`self_valid`), which cross keys (`cross_mask`), and the row's relative-position
shift (`delta`, AdapterHub prefixes). A request takes a row when admitted and gives it back when it ends;
the pool's tensors are allocated once, sized by rows x (self_len + cross_len) tokens.
"""
from __future__ import annotations

import torch

from ..config import T5Config


class KVPool:
    def __init__(self, cfg: T5Config, rows: int, self_len: int, cross_len: int, device="cpu",
                 dtype=torch.float32):
        if rows < 1 or self_len < 2 or cross_len < 1:
            raise ValueError(f"KVPool needs rows >= 1, self_len >= 2, cross_len >= 1; got {rows}, {self_len}, "
                             f"{cross_len}")
        n, H, dk = cfg.n_dec_layers, cfg.num_heads, cfg.d_kv
        z = lambda T: torch.zeros(n, rows, H, T, dk, device=device, dtype=dtype)  # noqa: E731
        self.self_k, self.self_v, self.cross_k, self.cross_v = z(self_len), z(self_len), z(cross_len), z(cross_len)
        self.self_valid = torch.zeros(rows, self_len, dtype=torch.bool, device=device)
        self.cross_mask = torch.zeros(rows, cross_len, dtype=torch.bool, device=device)
        self.delta = torch.zeros(rows, dtype=torch.long, device=device)
        self.rows, self.self_len, self.cross_len = rows, self_len, cross_len
        self._free = list(range(rows - 1, -1, -1))

    def alloc(self) -> int | None:
        """A free row (cleared), or None when every row is taken."""
        if not self._free:
            return None
        r = self._free.pop()
        self.self_valid[r] = False
        self.cross_mask[r] = False
        self.delta[r] = 0
        return r

    def release(self, row: int) -> None:
        if row in self._free or not 0 <= row < self.rows:
            raise ValueError(f"KVPool: row {row} is not taken")
        self._free.append(row)

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.rows - len(self._free)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.self_k, self.self_v, self.cross_k, self.cross_v,
                                                          self.self_valid, self.cross_mask, self.delta))

    def bytes_per_row(self) -> int:
        return self.nbytes() // self.rows

    def seed(self, rows: list[int], state) -> None:
        """Write a T5.RowState (cross keys/values and mask, decoder prefix, shift) into freshly taken rows."""
        rt = torch.tensor(rows, device=self.delta.device)
        W = state.cross_mask.shape[1]
        for layer, (k, v) in enumerate(state.cross_kv):
            self.cross_k[layer][rt, :, :W] = k.to(self.cross_k.dtype)
            self.cross_v[layer][rt, :, :W] = v.to(self.cross_v.dtype)
        self.cross_mask[rt, :W] = state.cross_mask
        P = state.prefix_len
        self.self_valid[rt, P:] = True
        if P:
            for layer, (k, v) in enumerate(state.prefix_kv):
                self.self_k[layer][rt, :, :P], self.self_v[layer][rt, :, :P] = k, v
            self.self_valid[rt, :P] = state.prefix_mask
        if state.delta is not None:
            self.delta[rt] = state.delta


class PoolRows:
    """The active rows of the pool as the per-row cache T5.decode_rows reads (see there): each row's query
    position, its valid self-attention keys, its cross keys and mask, its relative-position shift."""

    def __init__(self, pool: KVPool, rows: torch.Tensor, qpos: torch.Tensor, length: int, width: int):
        self.pool, self.rows, self.qpos, self.length, self.width = pool, rows, qpos, length, width
        self.delta = pool.delta[rows]
        self.self_valid = pool.self_valid[rows, :length]
        self.cross_mask = pool.cross_mask[rows, :width]

    def layer(self, i: int) -> "RowCache":
        return RowCache(self.pool, i, self.rows, self.qpos, self.length)

    def cross(self, i: int):
        return self.pool.cross_k[i][self.rows, :, :self.width], self.pool.cross_v[i][self.rows, :, :self.width]


class RowCache:
    """One decoder layer's self-attention cache for the active rows, each writing at its own position (the
    `cache` our T5 attention calls `write(k, v, pos)` on; `pos` is per row here, not shared)."""

    def __init__(self, pool: KVPool, layer: int, rows: torch.Tensor, qpos: torch.Tensor, length: int):
        self.k, self.v = pool.self_k[layer], pool.self_v[layer]
        self.rows, self.qpos, self.length = rows, qpos, length

    def write(self, k, v, pos=None):
        self.k[self.rows, :, self.qpos] = k[:, :, 0]
        self.v[self.rows, :, self.qpos] = v[:, :, 0]
        return self.k[self.rows, :, :self.length], self.v[self.rows, :, :self.length]
