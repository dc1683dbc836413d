"""Triton kernels against the PyTorch references, under TRITON_INTERPRET=1 on CPU (and on a GPU when present)."""
import math

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from helpers import tol  # noqa: E402
from peftu_kernels.ops import reference as R  # noqa: E402
from peftu_kernels.ops.segments import make_segments  # noqa: E402
from peftu_kernels.triton import autograd as T  # noqa: E402
from peftu_kernels.triton.adapter import adapter_into  # noqa: E402
from peftu_kernels.triton.ia3 import ia3_into  # noqa: E402
from peftu_kernels.triton.seg import seg_outer  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
TOL = {dt: tol(dt, "kernel") for dt in (torch.float32, torch.float16, torch.bfloat16)}


def popularity(kind: str, B: int, S: int, g) -> torch.Tensor:
    if kind == "distinct":
        return torch.randperm(S, generator=g)[:B]
    if kind == "same":
        return torch.full((B,), int(torch.randint(0, S, (1,), generator=g)))
    if kind == "zipf":
        p = 1.0 / torch.arange(1, S + 1, dtype=torch.float64)
        return torch.multinomial(p / p.sum(), B, replacement=True, generator=g)
    s = torch.randint(0, S, (B,), generator=g)  # "uniform" with rows that have no adapter
    s[torch.rand(B, generator=g) < 0.3] = -1
    return s


def lora_inputs(B, L, K, N, ranks, pop, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    S, Rm = len(ranks), max(ranks)
    A = torch.randn(S, Rm, K, generator=g) / math.sqrt(K)
    Bw = torch.randn(S, N, Rm, generator=g) / math.sqrt(Rm)
    for s, r in enumerate(ranks):  # padding beyond each slot's rank is zero in a bank
        A[s, r:], Bw[s, :, r:] = 0, 0
    x = torch.randn(B, L, K, generator=g)
    y = torch.randn(B, L, N, generator=g)
    scale = torch.rand(S, generator=g) + 0.5
    slots = popularity(pop, B, S, g)
    cast = lambda t: t.to(DEV, dtype)
    return cast(y), cast(x), cast(A), cast(Bw), scale.to(DEV), slots.to(DEV), torch.tensor(ranks, device=DEV)


CASES = [  # (B, L, K, N, ranks, popularity)
    (1, 1, 17, 23, [1], "distinct"),
    (5, 3, 40, 33, [8, 8, 8, 8, 8, 8], "distinct"),
    (6, 19, 31, 45, [1, 16, 3, 64], "zipf"),
    (7, 2, 64, 48, [4, 9, 2, 5, 7], "uniform"),
    (4, 9, 24, 20, [5, 5, 5], "same"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}L{c[1]}K{c[2]}N{c[3]}r{max(c[4])}-{c[5]}")
@pytest.mark.parametrize("fused", [False, True])
def test_lora_matches_reference(case, dtype, fused):
    B, L, K, N, ranks, pop = case
    y, x, A, Bw, scale, slots, rank = lora_inputs(B, L, K, N, ranks, pop, dtype, seed=B * 100 + L)
    ref = R.lora(y.float(), x.float(), A.float(), Bw.float(), scale, slots)
    from peftu_kernels.triton.lora import lora_
    got = lora_(y.clone(), x, A, Bw, scale, slots, rank, fused=fused)
    torch.testing.assert_close(got.float(), ref, **TOL[dtype])
    off = slots < 0
    assert torch.equal(got[off], y[off])  # rows without an adapter untouched
    if (slots >= 0).any():
        assert (got.float() - y.float()).abs().max() > 1e-2  # the adapter did something


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ["relu", "silu", "gelu", "gelu_new", "tanh"])
def test_adapter_matches_reference_and_writes_every_element(dtype, act):
    g = torch.Generator().manual_seed(len(act))
    B, L, D, M, S = 6, 5, 37, 11, 4
    h, res = torch.randn(B, L, D, generator=g), torch.randn(B, L, D, generator=g)
    down, up = torch.randn(S, M, D, generator=g) / math.sqrt(D), torch.randn(S, D, M, generator=g) / math.sqrt(M)
    db, ub = torch.randn(S, M, generator=g), torch.randn(S, D, generator=g)
    slots = torch.tensor([0, -1, 3, 3, 1, -1])
    cast = lambda t: t.to(DEV, dtype)
    ref = R.adapter(h, res, down, db, up, ub, act, slots)
    out = torch.full((B, L, D), float("nan"), dtype=dtype, device=DEV)  # poisoned
    adapter_into(out, cast(h), cast(res), cast(down), cast(db), cast(up), cast(ub), act, slots.to(DEV))
    assert not out.isnan().any()
    torch.testing.assert_close(out.float().cpu(), ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ia3_matches_reference_and_writes_every_element(dtype):
    g = torch.Generator().manual_seed(3)
    x, vec = torch.randn(5, 7, 45, generator=g), torch.rand(3, 45, generator=g) + 0.5
    slots = torch.tensor([2, -1, 0, 2, 1])
    out = torch.full(x.shape, float("nan"), dtype=dtype, device=DEV)
    ia3_into(out, x.to(DEV, dtype), vec.to(DEV, dtype), slots.to(DEV))
    torch.testing.assert_close(out.float().cpu(), R.ia3_scale(x, vec, slots), **TOL[dtype])


def test_segmented_outer_writes_present_slots_only():
    g = torch.Generator().manual_seed(5)
    U, V = torch.randn(6, 5, 9, generator=g), torch.randn(6, 5, 13, generator=g)
    slots = torch.tensor([2, 0, -1, 2, 2, 0])
    out = torch.full((4, 9, 13), float("nan"))
    seg_outer(U.to(DEV), V.to(DEV), make_segments(slots.to(DEV)), out := out.to(DEV))
    for s in (0, 2):
        rows = (slots == s).nonzero().squeeze(1)
        ref = sum(U[b].T @ V[b] for b in rows.tolist())
        torch.testing.assert_close(out[s].cpu(), ref, **tol(torch.float32))
    assert out[1].isnan().all() and out[3].isnan().all()


def _grads(fn, inputs):
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*inputs)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out)
    (out * w).sum().backward()
    return out, [t.grad for t in inputs if t.is_floating_point()]


@pytest.mark.parametrize("case", CASES[1:4], ids=lambda c: f"r{max(c[4])}-{c[5]}")
def test_lora_gradients_match_autograd_through_reference(case):
    B, L, K, N, ranks, pop = case
    y, x, A, Bw, scale, slots, rank = lora_inputs(B, L, K, N, ranks, pop, torch.float32, seed=7)
    ref_out, ref_g = _grads(lambda y_, x_, A_, B_: R.lora(y_, x_, A_, B_, scale, slots), [y, x, A, Bw])
    out, got_g = _grads(lambda y_, x_, A_, B_: T.lora(y_, x_, A_, B_, scale, slots, rank), [y, x, A, Bw])
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    for name, a, b in zip(["y", "x", "A", "B"], got_g, ref_g):
        torch.testing.assert_close(a, b, **TOL[torch.float32], msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("act", ["silu", "relu", "gelu_new"])
def test_adapter_gradients_match_autograd_through_reference(act):
    g = torch.Generator().manual_seed(11)
    B, L, D, M, S = 5, 4, 21, 6, 3
    ins = [torch.randn(B, L, D, generator=g), torch.randn(B, L, D, generator=g),
           torch.randn(S, M, D, generator=g) / 4, torch.randn(S, M, generator=g),
           torch.randn(S, D, M, generator=g) / 3, torch.randn(S, D, generator=g)]
    slots = torch.tensor([1, -1, 1, 0, 2])
    ins = [t.to(DEV) for t in ins]
    ref_out, ref_g = _grads(lambda *a: R.adapter(*a, act, slots.to(DEV)), ins)
    out, got_g = _grads(lambda *a: T.adapter(*a, act, slots.to(DEV)), ins)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    for name, a, b in zip(["h", "residual", "down", "down_bias", "up", "up_bias"], got_g, ref_g):
        torch.testing.assert_close(a, b, **TOL[torch.float32], msg=lambda m: f"grad {name}: {m}")


def test_ia3_gradients_match_autograd_through_reference():
    g = torch.Generator().manual_seed(13)
    x, vec = torch.randn(5, 6, 19, generator=g), torch.rand(3, 19, generator=g) + 0.5
    slots = torch.tensor([0, 2, -1, 0, 1])
    ref_out, ref_g = _grads(lambda a, b: R.ia3_scale(a, b, slots), [x, vec])
    out, got_g = _grads(lambda a, b: T.ia3_scale(a, b, slots.to(DEV)), [x.to(DEV), vec.to(DEV)])
    for a, b in zip(got_g, ref_g):
        torch.testing.assert_close(a.cpu(), b, **TOL[torch.float32])


def test_bad_shapes_are_refused():
    y, x, A, Bw, scale, slots, rank = lora_inputs(2, 3, 8, 5, [2, 2], "distinct", torch.float32, 1)
    with pytest.raises(ValueError, match="lora: A"):
        T.lora(y, x, A[:, :, :7], Bw, scale, slots)
    with pytest.raises(ValueError, match="activation 'mish'"):
        adapter_into(torch.empty(1, 1, 4), torch.zeros(1, 1, 4), torch.zeros(1, 1, 4), torch.zeros(1, 2, 4),
                     torch.zeros(1, 2), torch.zeros(1, 4, 2), torch.zeros(1, 4), "mish", torch.zeros(1, dtype=torch.long))


@pytest.mark.slow
@pytest.mark.parametrize("pop", ["distinct", "uniform", "zipf", "same"])
@pytest.mark.parametrize("rank", [1, 2, 7, 16, 33, 64])
def test_lora_sweep_ranks_and_popularity(pop, rank):
    """Heavier sweep (pytest -m slow): every rank 1-64 against every popularity, odd sizes, both paths."""
    from peftu_kernels.triton.lora import lora_
    for dtype in DTYPES:
        ranks = [rank, max(1, rank // 3), rank, 1, rank, 2, rank, 5, rank, 3]  # >= 9 slots: distinct rows fit
        y, x, A, Bw, scale, slots, rk = lora_inputs(9, 21, 45, 37, ranks, pop, dtype, seed=rank)
        ref = R.lora(y.float(), x.float(), A.float(), Bw.float(), scale, slots)
        for fused in (False, True):
            got = lora_(y.clone(), x, A, Bw, scale, slots, rk, fused=fused)
            torch.testing.assert_close(got.float(), ref, **TOL[dtype])
