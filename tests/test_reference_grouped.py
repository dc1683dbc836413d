"""The reference ops' grouped path (rows already k per user, one matmul per user) equals the per-row path."""
import pytest
import torch

from helpers import tol

from peftu_kernels.ops import reference as R
from peftu_kernels.ops.segments import Segments, make_segments


def per_row(seg: Segments) -> Segments:
    return Segments(seg.order, seg.starts, seg.slot, 0)


def test_make_segments_spots_the_grouped_layout():
    assert make_segments(torch.tensor([2, 2, 0, 0, 5, 5])).group == 0  # not in slot order: sorting would move rows
    assert make_segments(torch.tensor([0, 0, 2, 2, 5, 5])).group == 2
    assert make_segments(torch.tensor([0, 0, 2, 5, 5, 5])).group == 0  # unequal counts
    assert make_segments(torch.tensor([0, 0, -1, -1, 5, 5])).group == 0  # rows without a module
    assert make_segments(torch.tensor([3, 3, 3])).group == 0  # one user: the plain-matmul path handles it


@pytest.mark.parametrize("k,L", [(1, 5), (3, 7), (4, 1)])
def test_grouped_lora_and_adapter_match_per_row(k, L):
    g = torch.Generator().manual_seed(k * 10 + L)
    S, D, Do, r, U = 6, 12, 10, 4, 3
    slots = torch.tensor([1, 4, 5]).repeat_interleave(k)
    seg = make_segments(slots)
    assert seg.group == k
    x = torch.randn(U * k, L, D, generator=g, requires_grad=True)
    y = torch.randn(U * k, L, Do, generator=g)
    A, B = torch.randn(S, r, D, generator=g, requires_grad=True), torch.randn(S, Do, r, generator=g, requires_grad=True)
    scale = torch.rand(S, generator=g) + 0.5
    down, up = torch.randn(S, 5, D, generator=g, requires_grad=True), torch.randn(S, D, 5, generator=g, requires_grad=True)
    db, ub = torch.randn(S, 5, generator=g, requires_grad=True), torch.randn(S, D, generator=g, requires_grad=True)
    res = torch.randn(U * k, L, D, generator=g)
    w1, w2 = torch.randn(U * k, L, Do, generator=g), torch.randn(U * k, L, D, generator=g)
    outs = []
    for s in (seg, per_row(seg)):
        lo = R.lora(y, x, A, B, scale, slots, seg=s)
        ad = R.adapter(x, res, down, db, up, ub, "relu", slots, seg=s)
        grads = torch.autograd.grad((lo * w1).sum() + (ad * w2).sum(), (x, A, B, down, up, db, ub))
        outs.append((lo, ad, *grads))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, **tol())
    assert float(outs[0][3][0].abs().sum()) == 0  # slot 0 is in no row: no gradient reaches it
