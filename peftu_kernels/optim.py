"""AdamW with per-slot state: every user (slot) has its own step count and learning rate, and only the
slots that took part in a step are updated, so a user's trajectory depends only on that user's data.

The weights and moments live in flat (S, N) buffers. The optimiser adopts the caller's tensors: each becomes
a view of its flat weights (same tensor object, new storage), so a bank that holds them keeps serving what
the optimiser updates; a tensor that is later replaced (a bank that grew) is caught at the next step. A step
gathers the gradients with one cat: clipping and the update are a handful of ops whatever the
number of tensors, which on a GPU saves launches and host syncs, on a CPU Python overhead."""
from __future__ import annotations

import torch


class SlotAdamW:
    def __init__(self, params: list[torch.Tensor], n_slots: int, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        self.params, self.betas, self.eps, self.wd = params, betas, eps, weight_decay
        self.steps = torch.zeros(n_slots, dtype=torch.long)
        like = params[0] if params else torch.zeros(0)
        if any(p.dtype != like.dtype or p.device != like.device or p.shape[0] != n_slots for p in params):
            raise ValueError("SlotAdamW: parameters must share dtype, device and slot count "
                             f"({[(tuple(p.shape), p.dtype) for p in params]})")
        self.sizes = [p[0].numel() for p in params]
        self.flat = torch.cat([p.detach().reshape(n_slots, -1) for p in params], 1) if params else \
            torch.zeros(n_slots, 0, dtype=like.dtype, device=like.device)
        self.m = torch.zeros_like(self.flat, dtype=torch.float32)
        self.v = torch.zeros_like(self.flat, dtype=torch.float32)
        off, self._ptrs = 0, []
        for p, n in zip(params, self.sizes):
            p.data = self.flat[:, off:off + n].view(p.shape)  # the same tensor object, backed by the flat buffer
            self._ptrs.append(p.data_ptr())
            off += n

    def _check_adopted(self) -> None:
        moved = [i for i, (p, ptr) in enumerate(zip(self.params, self._ptrs)) if p.data_ptr() != ptr]
        if moved:
            raise RuntimeError(f"SlotAdamW: parameters {moved} no longer share the optimiser's storage (were they "
                               f"replaced, e.g. by a bank that grew?); build the optimiser after the bank is final")

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _grads(self, sl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The slots' gradients (U, N) fp32, and a column mask of tensors without a .grad (None if all have one):
        torch.optim skips those entirely (no weight decay, no moment update)."""
        U, dev = sl.numel(), self.flat.device
        pairs = list(zip(self.params, self.sizes))
        g = torch.cat([p.grad[sl].reshape(U, -1) if p.grad is not None else torch.zeros(U, n, device=dev)
                       for p, n in pairs] or [torch.zeros(U, 0, device=dev)], 1).float()
        if all(p.grad is not None for p in self.params):
            return g, None
        return g, torch.cat([torch.full((n,), p.grad is None, device=dev) for p, n in pairs])

    @torch.no_grad()
    def step(self, slots: torch.Tensor, lrs: torch.Tensor, max_norm: float | None = None) -> torch.Tensor | None:
        """Update `slots` (long) with their learning rates `lrs` (same length), as torch.optim.AdamW does, after
        clipping each slot's gradient to `max_norm` (HF Trainer's max_grad_norm, per user). Returns the norms."""
        self._check_adopted()
        b1, b2 = self.betas
        dev = self.flat.device
        sl = slots.to(dev)
        g, skip = self._grads(sl)
        norm = None
        if max_norm:
            norm = g.pow(2).sum(1).sqrt()
            g = g * (max_norm / (norm + 1e-6)).clamp(max=1.0)[:, None]
        self.steps[slots] += 1
        t = self.steps[slots].double()
        bc1 = (1 - b1 ** t).float().to(dev)[:, None]
        bc2_sqrt = (1 - b2 ** t).sqrt().float().to(dev)[:, None]
        lr = lrs.float().to(dev)[:, None]
        ps = self.flat[sl].float() * (1 - lr * self.wd)
        ms = self.m[sl].mul_(b1).add_(g, alpha=1 - b1)
        vs = self.v[sl].mul_(b2).addcmul_(g, g, value=1 - b2)
        ps -= (lr / bc1) * ms / (vs.sqrt() / bc2_sqrt + self.eps)
        if skip is not None:
            ps, ms, vs = (torch.where(skip, old[sl].float(), new) for old, new in ((self.flat, ps), (self.m, ms),
                                                                                  (self.v, vs)))
        self.flat[sl], self.m[sl], self.v[sl] = ps.to(self.flat.dtype), ms, vs
        return norm

    def _split(self, row: torch.Tensor) -> list[torch.Tensor]:
        return [c.reshape(p.shape[1:]).clone() for c, p in zip(row.split(self.sizes), self.params)]

    def slot_state(self, slot: int) -> dict[str, torch.Tensor]:
        out = {"steps": self.steps[slot:slot + 1].clone()}
        for i, (m, v) in enumerate(zip(self._split(self.m[slot]), self._split(self.v[slot]))):
            out[f"m.{i}"], out[f"v.{i}"] = m, v
        return out

    def load_slot_state(self, slot: int, st: dict[str, torch.Tensor]) -> None:
        self.steps[slot] = int(st["steps"][0])
        for name, buf in (("m", self.m), ("v", self.v)):
            if self.params:
                buf[slot] = torch.cat([st[f"{name}.{i}"].reshape(-1).to(buf) for i in range(len(self.params))])


def linear_warmup(step: int, total: int, warmup: int) -> float:
    """HF's get_linear_schedule_with_warmup multiplier for the `step`-th optimiser step (0-based)."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))
