"""BatchMeta: who is in the batch, computed once per batch and handed to every layer."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segments:
    """Rows sorted by slot: the SGMV layout. `order` sorts rows, segment i covers sorted rows
    [starts[i], starts[i+1]) and uses bank slot `slot[i]`; rows without a module are left out.
    `group` = k > 0 when the rows already come in that layout with k rows per segment (a trainer's batch:
    each user's k examples in a row): then the CPU path runs one matmul per user instead of one per row."""
    order: torch.Tensor
    starts: torch.Tensor
    slot: torch.Tensor
    group: int = 0

    def to(self, device) -> "Segments":
        return Segments(self.order.to(device), self.starts.to(device), self.slot.to(device), self.group)


def make_segments(slots: torch.Tensor) -> Segments:
    """Sort rows by slot (stable) and cut them into one segment per distinct slot; rows < 0 left out."""
    order = torch.argsort(slots, stable=True)
    order = order[slots[order] >= 0]
    uniq, counts = torch.unique_consecutive(slots[order], return_counts=True)
    starts = torch.cat([torch.zeros(1, dtype=torch.long, device=slots.device), counts.cumsum(0)])
    n, k = slots.numel(), int(counts[0]) if counts.numel() else 0
    grouped = counts.numel() > 1 and order.numel() == n and bool((counts == k).all()) and \
        bool((order == torch.arange(n, device=slots.device)).all())
    return Segments(order, starts, uniq, k if grouped else 0)


@dataclass(frozen=True)
class BatchMeta:
    slots: dict[str, torch.Tensor]        # bank key -> (B,) long, -1 = this row has no module there
    segments: dict[str, Segments]
    batch_size: int

    @classmethod
    def build(cls, per_row: list[dict[str, int]], device, bank_slots: dict[str, int] | None = None) -> "BatchMeta":
        """`bank_slots`: each bank's size; every slot is checked against it here, once, on the host, so that
        no kernel is ever handed an index past its bank."""
        keys = sorted({k for r in per_row for k in r})
        slots, segs = {}, {}
        for k in keys:
            vals = [r.get(k, -1) for r in per_row]
            if bank_slots is not None and not all(-1 <= v < bank_slots.get(k, 0) for v in vals):
                raise IndexError(f"BatchMeta: bank {k!r} has {bank_slots.get(k, 0)} slots, rows ask for {vals}")
            s = torch.tensor(vals, dtype=torch.long)
            slots[k] = s.to(device)
            segs[k] = make_segments(s).to(device)  # sorted on the host: no device syncs per batch
        return cls(slots, segs, len(per_row))

    def has(self, key: str) -> bool:
        return key in self.slots
