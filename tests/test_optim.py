"""SlotAdamW against torch.optim.AdamW run separately for each slot."""
import torch

from peftu_kernels.optim import SlotAdamW


def test_slot_adamw_equals_per_slot_torch_adamw():
    """Slots step on different steps with their own data; a tensor no loss reaches (c) is left alone, as
    torch.optim leaves a parameter whose .grad is None (no weight decay, no moments)."""
    g = torch.Generator().manual_seed(0)
    S = 4
    init = [torch.randn(S, 3, generator=g), torch.randn(S, 2, 5, generator=g), torch.randn(S, 2, generator=g)]
    ref = {s: [t[s].clone().requires_grad_(True) for t in init] for s in range(S)}
    opts = {s: torch.optim.AdamW(ref[s], lr=0.1, weight_decay=0.05) for s in range(S)}
    pa, pb, pc = (t.clone().requires_grad_(True) for t in init)
    opt = SlotAdamW([pa, pb, pc], S, weight_decay=0.05)
    assert pa.data_ptr() == opt.flat.data_ptr()  # the caller's tensors now live in the flat buffer
    for it in range(5):
        slots = torch.tensor([0, 2] if it % 2 == 0 else [1, 2, 3])
        lr = 0.1 * (it + 1) / 5
        w = torch.randn(S, 3, generator=g)
        ((pa * w)[slots].pow(2).sum() + (pb[slots] ** 3).sum()).backward()
        opt.step(slots, torch.full((len(slots),), lr), max_norm=1.5)
        opt.zero_grad()
        for s in slots.tolist():
            ra, rb, _ = ref[s]
            ((ra * w[s]).pow(2).sum() + (rb ** 3).sum()).backward()
            torch.nn.utils.clip_grad_norm_(ref[s], 1.5)
            for group in opts[s].param_groups:
                group["lr"] = lr
            opts[s].step()
            opts[s].zero_grad(set_to_none=True)
    for s in range(S):
        for got, want in zip((pa, pb, pc), ref[s]):
            torch.testing.assert_close(got[s].detach(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pc.detach(), init[2], rtol=0, atol=0)
    assert opt.steps.tolist() == [3, 2, 5, 2]


def test_slot_state_round_trips():
    S = 3
    p = torch.randn(S, 2, 2, requires_grad=True)
    q = torch.randn(S, 5, requires_grad=True)
    opt = SlotAdamW([p, q], S)
    (p.sum() + q.pow(2).sum()).backward()
    opt.step(torch.tensor([0, 1, 2]), torch.full((3,), 0.01))
    st = opt.slot_state(1)
    assert st["m.0"].shape == (2, 2) and st["v.1"].shape == (5,)
    p2, q2 = torch.zeros(S, 2, 2, requires_grad=True), torch.zeros(S, 5, requires_grad=True)
    other = SlotAdamW([p2, q2], S)
    other.load_slot_state(2, st)
    torch.testing.assert_close(other.m[2], opt.m[1])
    torch.testing.assert_close(other.v[2], opt.v[1])
    assert int(other.steps[2]) == 1 and int(other.steps[0]) == 0
