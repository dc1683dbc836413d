"""BatchMeta: who is in the batch, computed once per batch and handed to every layer."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ops.segments import Segments, make_segments

__all__ = ["BatchMeta", "Segments", "make_segments"]


@dataclass(frozen=True)
class BatchMeta:
    slots: dict[str, torch.Tensor]        # bank key -> (B,) long, -1 = this row has no module there
    segments: dict[str, Segments]
    batch_size: int
    host: dict[str, list[int]] = field(default_factory=dict)  # the same slots as host lists (plans read them)

    @classmethod
    def build(cls, per_row: list[dict[str, int]], device, bank_slots: dict[str, int] | None = None) -> "BatchMeta":
        """`bank_slots`: each bank's size; every slot is checked against it here, once, on the host, so that
        no kernel is ever handed an index past its bank."""
        keys = sorted({k for r in per_row for k in r})
        slots, segs, host = {}, {}, {}
        for k in keys:
            vals = [r.get(k, -1) for r in per_row]
            if bank_slots is not None and not all(-1 <= v < bank_slots.get(k, 0) for v in vals):
                raise IndexError(f"BatchMeta: bank {k!r} has {bank_slots.get(k, 0)} slots, rows ask for {vals}")
            s = torch.tensor(vals, dtype=torch.long)
            slots[k], host[k] = s.to(device), vals
            segs[k] = make_segments(s).to(device)  # sorted on the host: no device syncs per batch
        return cls(slots, segs, len(per_row), host)

    def has(self, key: str) -> bool:
        return key in self.slots
