"""BatchMeta: who is in the batch, computed once per batch and handed to every layer."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segments:
    """Rows sorted by slot: the SGMV layout. `order` sorts rows, segment i covers sorted rows
    [starts[i], starts[i+1]) and uses bank slot `slot[i]`; rows without a module are left out."""
    order: torch.Tensor
    starts: torch.Tensor
    slot: torch.Tensor


def make_segments(slots: torch.Tensor) -> Segments:
    """Sort rows by slot (stable) and cut them into one segment per distinct slot; rows < 0 left out."""
    order = torch.argsort(slots, stable=True)
    order = order[slots[order] >= 0]
    uniq, counts = torch.unique_consecutive(slots[order], return_counts=True)
    starts = torch.cat([torch.zeros(1, dtype=torch.long, device=slots.device), counts.cumsum(0)])
    return Segments(order, starts, uniq)


@dataclass(frozen=True)
class BatchMeta:
    slots: dict[str, torch.Tensor]        # bank key -> (B,) long, -1 = this row has no module there
    segments: dict[str, Segments]
    batch_size: int

    @classmethod
    def build(cls, per_row: list[dict[str, int]], device) -> "BatchMeta":
        keys = sorted({k for r in per_row for k in r})
        slots, segs = {}, {}
        for k in keys:
            s = torch.tensor([r.get(k, -1) for r in per_row], dtype=torch.long)
            slots[k] = s.to(device)
            segs[k] = make_segments(s.to(device))
        return cls(slots, segs, len(per_row))

    def has(self, key: str) -> bool:
        return key in self.slots
