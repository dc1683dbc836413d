"""AdamW with per-slot state: every user (slot) has its own step count and learning rate, and only the
slots that took part in a step are updated, so a user's trajectory depends only on that user's data."""
from __future__ import annotations

import torch


class SlotAdamW:
    def __init__(self, params: list[torch.Tensor], n_slots: int, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        self.params, self.betas, self.eps, self.wd = params, betas, eps, weight_decay
        self.m = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        self.v = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        self.steps = torch.zeros(n_slots, dtype=torch.long)

    def clip_(self, slots: torch.Tensor, max_norm: float) -> torch.Tensor:
        """Per-slot gradient-norm clipping (HF Trainer's max_grad_norm, done per user). Returns the norms."""
        sq = torch.zeros(len(slots), dtype=torch.float32)
        for p in self.params:
            if p.grad is not None:
                sq += p.grad[slots].float().pow(2).flatten(1).sum(1).cpu()
        norm = sq.sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in self.params:
            if p.grad is not None:
                shape = (-1,) + (1,) * (p.dim() - 1)
                p.grad[slots] *= coef.to(p.grad.device, p.grad.dtype).view(shape)
        return norm

    @torch.no_grad()
    def step(self, slots: torch.Tensor, lrs: torch.Tensor) -> None:
        """Update `slots` (long) with their learning rates `lrs` (same length), as torch.optim.AdamW does."""
        b1, b2 = self.betas
        self.steps[slots] += 1
        t = self.steps[slots].double()
        dev = self.params[0].device if self.params else "cpu"
        bc1 = (1 - b1 ** t).float().to(dev)
        bc2_sqrt = (1 - b2 ** t).sqrt().float().to(dev)
        lr = lrs.float().to(dev)
        sl = slots.to(dev)
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)
            g = p.grad[sl].float()
            ps = p.data[sl].float() * (1 - lr * self.wd).view(shape)
            ms = m[sl].mul_(b1).add_(g, alpha=1 - b1)
            vs = v[sl].mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = vs.sqrt() / bc2_sqrt.view(shape) + self.eps
            ps -= (lr / bc1).view(shape) * ms / denom
            p.data[sl], m[sl], v[sl] = ps.to(p.dtype), ms, vs

    def slot_state(self, slot: int) -> dict[str, torch.Tensor]:
        out = {"steps": self.steps[slot:slot + 1].clone()}
        for i, (m, v) in enumerate(zip(self.m, self.v)):
            out[f"m.{i}"], out[f"v.{i}"] = m[slot].clone(), v[slot].clone()
        return out

    def load_slot_state(self, slot: int, st: dict[str, torch.Tensor]) -> None:
        self.steps[slot] = int(st["steps"][0])
        for i, (m, v) in enumerate(zip(self.m, self.v)):
            m[slot], v[slot] = st[f"m.{i}"], st[f"v.{i}"]


def linear_warmup(step: int, total: int, warmup: int) -> float:
    """HF's get_linear_schedule_with_warmup multiplier for the `step`-th optimiser step (0-based)."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))
