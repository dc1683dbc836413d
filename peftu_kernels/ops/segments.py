"""Segments: a batch's rows grouped by bank slot (the SGMV layout), built once per batch on the host.

Ops and kernels read them; they know nothing of users or banks. `tenancy.meta.BatchMeta` builds one per
bank of a batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segments:
    """`order` sorts rows by slot; segment i covers sorted rows [starts[i], starts[i+1]) and uses bank slot
    `slot[i]`; rows without a module are left out. Facts the ops would otherwise find with a host sync:
    `rows` = the rows that have a module (None when every row does), `single` = the one slot of a batch whose
    every row has the same module (-1 otherwise), `group` = k > 0 when the rows already come in that layout
    with k rows per segment (a trainer's batch: each user's k examples in a row), so the CPU path runs one
    matmul per user instead of one per row."""
    order: torch.Tensor
    starts: torch.Tensor
    slot: torch.Tensor
    group: int = 0
    rows: torch.Tensor | None = None
    single: int = -1
    n_active: int = -1  # -1: the facts above are unknown (a hand-built Segments); ops then find them
    tile_rows: torch.Tensor | None = None  # (T, TILE) each segment's rows cut into tiles of TILE, -1 padded
    tile_slot: torch.Tensor | None = None  # (T,) the slot of each tile (decode kernels: one program per tile)

    def to(self, device) -> "Segments":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Segments(self.order.to(device), self.starts.to(device), self.slot.to(device), self.group,
                        mv(self.rows), self.single, self.n_active, mv(self.tile_rows), mv(self.tile_slot))


TILE = 16  # rows of one user a decode program serves together (SGMV); 16 is tl.dot's smallest M


def _tiles(order, starts, slot, tile: int = TILE):
    """Each segment's sorted rows cut into tiles of `tile` rows (the last one -1 padded), on the host."""
    counts = starts[1:] - starts[:-1]
    n = (counts + tile - 1) // tile
    seg = torch.repeat_interleave(torch.arange(counts.numel()), n)
    first_tile = torch.cumsum(n, 0) - n
    start = starts[seg] + (torch.arange(seg.numel()) - first_tile[seg]) * tile
    idx = start[:, None] + torch.arange(tile)[None, :]
    valid = idx < starts[seg + 1][:, None]
    rows = torch.where(valid, order[idx.clamp(max=max(order.numel() - 1, 0))] if order.numel() else idx, -1)
    return rows, slot[seg]


def make_segments(slots: torch.Tensor) -> Segments:
    """Sort rows by slot (stable) and cut them into one segment per distinct slot; rows < 0 left out.
    Reads the slots on the host: call it where they live there (BatchMeta does), not per layer."""
    host = slots.cpu()
    order = torch.argsort(host, stable=True)
    order = order[host[order] >= 0]
    uniq, counts = torch.unique_consecutive(host[order], return_counts=True)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    n, k = host.numel(), int(counts[0]) if counts.numel() else 0
    every = order.numel() == n
    grouped = counts.numel() > 1 and every and bool((counts == k).all()) and bool((order == torch.arange(n)).all())
    rows = None if every else torch.sort(order).values
    single = int(uniq[0]) if every and uniq.numel() == 1 else -1
    tile_rows, tile_slot = _tiles(order, starts, uniq)
    seg = Segments(order, starts, uniq, k if grouped else 0, rows, single, int(order.numel()), tile_rows, tile_slot)
    return seg.to(slots.device)
