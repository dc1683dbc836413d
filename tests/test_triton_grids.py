"""The decode-shaped LoRA kernels (SGMV tiles and BGMV rows, split K and N) against the reference, under the
Triton interpreter: odd sizes, mixed ranks, repeated and distinct users, rows without a user, fp32 / fp16,
partial sums poisoned with NaN (every value read must have been written)."""
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from helpers import tol  # noqa: E402
from test_triton_ops import lora_inputs  # noqa: E402
from peftu_kernels.ops import reference as R  # noqa: E402
from peftu_kernels.ops.segments import make_segments  # noqa: E402
from peftu_kernels.triton import configs, sgmv  # noqa: E402
from peftu_kernels.triton import autograd as T  # noqa: E402

CASES = [  # (B, K, N, ranks, popularity)
    (1, 17, 23, [3], "distinct"),
    (5, 40, 33, [8, 8, 8, 8, 8, 8], "distinct"),
    (37, 31, 45, [1, 16, 3, 64], "zipf"),
    (20, 64, 48, [4, 9, 2, 5, 7], "uniform"),
    (40, 24, 20, [5, 5, 5], "same"),
]


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(sgmv, "_partials", lambda split, rows, R, device: torch.full((split, rows, R), float("nan"),
                                                                                      device=device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}K{c[1]}N{c[2]}r{max(c[3])}-{c[4]}")
@pytest.mark.parametrize("grouped,split_k", [(True, 1), (True, 3), (False, 1), (False, 2)])
def test_decode_lora_matches_reference(case, dtype, grouped, split_k, poisoned):
    B, K, N, ranks, pop = case
    y, x, A, Bw, scale, slots, rank = lora_inputs(B, 1, K, N, ranks, pop, dtype, seed=B * 7 + K)
    seg = make_segments(slots)
    ref = R.lora(y.float(), x.float(), A.float(), Bw.float(), scale, slots)
    cfg = dict(grouped=grouped, split_k=split_k, BLOCK_K=16, BLOCK_N=16, num_warps=1)
    got = sgmv.lora_decode_(y.clone(), x, A, Bw, scale, slots, rank, seg, cfg)
    torch.testing.assert_close(got.float(), ref, **tol(dtype, "kernel"))
    off = slots < 0
    assert torch.equal(got[off], y[off])  # rows without an adapter untouched


def test_the_triton_op_takes_the_decode_path_at_one_token(monkeypatch):
    """The backend's lora op routes one-token batches with Segments to the decode kernels (and equals the
    reference there); with a gradient, or with more tokens, it keeps the row kernels."""
    y, x, A, Bw, scale, slots, rank = lora_inputs(9, 1, 20, 12, [2, 5, 3], "zipf", torch.float32, seed=3)
    seg, calls = make_segments(slots), []
    real = sgmv.lora_decode_
    monkeypatch.setattr(sgmv, "lora_decode_", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = T.lora(y.clone(), x, A, Bw, scale, slots, rank, seg)
    assert calls, "one-token batch did not take the decode kernels"
    torch.testing.assert_close(got, R.lora(y, x, A, Bw, scale, slots), **tol(torch.float32, "kernel"))
    calls.clear()
    y2, x2, *_ = lora_inputs(9, 3, 20, 12, [2, 5, 3], "zipf", torch.float32, seed=4)
    T.lora(y2, x2, A, Bw, scale, slots, rank, seg)
    assert not calls


def test_decode_heuristic_fills_the_card():
    """Outside the interpreter: about two programs per SM, SGMV when users repeat, BGMV when rows differ."""
    old = configs.INTERPRET
    try:
        configs.INTERPRET = False
        distinct = configs.decode_config(64, 64, 768, 768, 8, sms=132)
        shared = configs.decode_config(64, 1, 768, 768, 8, sms=132)
    finally:
        configs.INTERPRET = old
    assert not distinct["grouped"] and shared["grouped"]
    for c, tiles in ((distinct, 64), (shared, 2)):
        programs = tiles * -(-768 // c["BLOCK_N"])
        assert programs >= 132 or c["BLOCK_N"] == 32, c
        assert tiles * c["split_k"] >= 132 or 768 // (2 * c["split_k"]) < 128, c


def test_tuned_configs_override_the_heuristic_per_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(configs, "TUNED", tmp_path)
    configs._tuned.cache_clear()
    old = configs.INTERPRET
    try:
        configs.INTERPRET = False
        base = configs.decode_config(48, 48, 768, 768, 8, gpu="NVIDIA H200", sms=132)
        f = configs.save_tuned("NVIDIA H200", {configs.key("lora_decode", 48, 768, 768, 8, False): {"BLOCK_N": 256}})
        assert f.name == "nvidia_h200.json"
        tuned = configs.decode_config(48, 48, 768, 768, 8, gpu="NVIDIA H200", sms=132)  # 48 rows -> the 64 bucket
        other = configs.decode_config(48, 48, 768, 768, 8, gpu="NVIDIA H100", sms=132)
    finally:
        configs.INTERPRET = old
        configs._tuned.cache_clear()
    assert tuned["BLOCK_N"] == 256 and base["BLOCK_N"] != 256 and other == base


@pytest.mark.parametrize("split", [1, 2, 5])
@pytest.mark.parametrize("shape", [(7, 3, 13, 9), (12, 1, 20, 33), (5, 17, 8, 6)], ids=lambda s: "B{}L{}P{}Q{}".format(*s))
def test_seg_outer_split_over_tokens_is_exact_and_deterministic(shape, split):
    from peftu_kernels.triton.seg import seg_outer
    B, L, P, Q = shape
    g = torch.Generator().manual_seed(B + L)
    U, V = torch.randn(B, L, P, generator=g), torch.randn(B, L, Q, generator=g)
    slots = torch.randint(0, 4, (B,), generator=g)
    slots[0] = -1  # a row without a module adds to nothing
    S = 6
    want = torch.full((S, P, Q), float("nan"))  # slots absent from the batch stay as they were
    for s in slots.unique().tolist():
        if s >= 0:
            r = slots == s
            want[s] = torch.einsum("blp,blq->pq", U[r].double(), V[r].double()).float()
    seg = make_segments(slots)
    got = seg_outer(U, V, seg, torch.full((S, P, Q), float("nan")), split=split)
    again = seg_outer(U, V, seg, torch.full((S, P, Q), float("nan")), split=split)
    torch.testing.assert_close(got, want, equal_nan=True, **tol(torch.float32, "kernel"))
    assert torch.equal(got.nan_to_num(7.0), again.nan_to_num(7.0))  # bitwise the same each run


def test_autotune_checks_every_candidate_and_caches_the_fastest(tmp_path, monkeypatch):
    """The autotuner's loop on the interpreter with a fake clock: each candidate is checked against the
    reference (a wrong one would raise), the fastest by the clock is what gets cached for the GPU."""
    from benchmarks import autotune
    monkeypatch.setattr(configs, "TUNED", tmp_path)
    configs._tuned.cache_clear()
    clock = iter(range(1000, 0, -1))  # each later timing is faster: the last candidate must win
    best, rows = autotune.tune([(6, 2, 20, 12, 3)], "cpu", torch.float32, timer=lambda fn: (fn(), next(clock))[1],
                               quick=True)
    cands = list(configs.candidates(20, quick=True))
    assert list(best.values()) == [cands[-1]] and rows[0]["heuristic_vs_best"] > 0
    configs.save_tuned("Fake GPU", best)
    assert configs._tuned("Fake GPU") == best
    configs._tuned.cache_clear()


@pytest.mark.parametrize("act", ["relu", "sigmoid", "gelu_new"])
@pytest.mark.parametrize("case", [(1, 17, [3], "distinct"), (23, 40, [5, 8, 2, 8], "zipf"),
                                  (20, 33, [4, 4, 4], "uniform"), (34, 24, [6], "same")],
                         ids=lambda c: f"B{c[0]}D{c[1]}-{c[3]}")
@pytest.mark.parametrize("grouped,split_k", [(True, 2), (False, 1)])
def test_decode_adapter_matches_reference(case, act, grouped, split_k, poisoned):
    """Bottleneck adapters of mixed widths (zero-padded as in a bank), rows without a user."""
    from test_triton_ops import popularity
    B, D, widths, pop = case
    g = torch.Generator().manual_seed(B + D)
    S, M = len(widths), max(widths)
    down, up = torch.randn(S, M, D, generator=g) / D ** 0.5, torch.randn(S, D, M, generator=g) / M ** 0.5
    db, ub = torch.randn(S, M, generator=g) * 0.1, torch.randn(S, D, generator=g) * 0.1
    for s, m in enumerate(widths):  # a bank's padding: zero units, zero biases, zero up columns
        down[s, m:], db[s, m:], up[s, :, m:] = 0, 0, 0
    h, res = torch.randn(B, 1, D, generator=g), torch.randn(B, 1, D, generator=g)
    slots = popularity(pop, B, S, g)
    seg = make_segments(slots)
    ref = R.adapter(h, res, down, db, up, ub, act, slots)
    cfg = dict(grouped=grouped, split_k=split_k, BLOCK_K=16, BLOCK_N=16, num_warps=1)
    got = sgmv.adapter_decode(h, res, down, db, up, ub, act, slots, seg, cfg)
    # act(0) != 0 for sigmoid: padded units are neutral only because up's padded columns are zero
    torch.testing.assert_close(got, ref, **tol(torch.float32, "kernel"))
    assert torch.equal(got[slots < 0], res[slots < 0])
    assert (got - res).abs().max() > 1e-3  # the adapter did something


def test_the_triton_adapter_op_takes_the_decode_path_at_one_token(monkeypatch):
    g = torch.Generator().manual_seed(0)
    S, M, D, B = 3, 5, 12, 8
    args = (torch.randn(B, 1, D, generator=g), torch.randn(B, 1, D, generator=g), torch.randn(S, M, D, generator=g),
            torch.randn(S, M, generator=g), torch.randn(S, D, M, generator=g), torch.randn(S, D, generator=g))
    slots = torch.tensor([0, 1, 2, -1, 0, 0, 1, 2])
    calls, real = [], sgmv.adapter_decode
    monkeypatch.setattr(sgmv, "adapter_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = T.adapter(*args, "silu", slots, seg=make_segments(slots))
    assert calls
    torch.testing.assert_close(got, R.adapter(*args, "silu", slots), **tol(torch.float32, "kernel"))


@pytest.mark.parametrize("n_sites", [2, 3])
@pytest.mark.parametrize("grouped", [True, False])
def test_group_expand_in_one_launch_matches_reference(n_sites, grouped, monkeypatch):
    """The expands of sites sharing an input (different N and R per site, mixed ranks, rows without a
    user) in one launch equal the reference site by site."""
    from peftu_kernels.triton import sgmv_group
    g = torch.Generator().manual_seed(n_sites)
    B, S = 21, 4
    Ns, Rs = [13, 40, 7][:n_sites], [3, 6, 2][:n_sites]
    slots = popularity_with_gaps(B, S, g)
    seg = make_segments(slots)
    h = torch.randn(B, 1, sum(Rs), generator=g)
    offsets = [sum(Rs[:j]) for j in range(n_sites)]
    Bs = [torch.randn(S, N, R, generator=g) for N, R in zip(Ns, Rs)]
    ranks = [torch.randint(1, R + 1, (S,), generator=g) for R in Rs]
    for Bw, rk in zip(Bs, ranks):
        for s in range(S):
            Bw[s, :, rk[s]:] = 0
    ys = [torch.randn(B, 1, N, generator=g) for N in Ns]
    want = R.lora_expand_group([y.clone() for y in ys], h, Bs, offsets, slots, ranks, seg)
    cfg = dict(grouped=grouped, split_k=1, BLOCK_K=16, BLOCK_N=16, num_warps=1)
    monkeypatch.setattr(sgmv_group, "decode_config", lambda *a, **k: cfg)
    launches = []
    real = sgmv_group._expand_group_kernel
    monkeypatch.setattr(sgmv_group, "_expand_group_kernel", type("K", (), {"__getitem__": lambda self, grid: (
        launches.append(grid), real[grid])[1]})())
    got = sgmv_group.lora_expand_group([y.clone() for y in ys], h, Bs, offsets, slots, ranks, seg)
    assert len(launches) == 1
    for j in range(n_sites):
        torch.testing.assert_close(got[j], want[j], **tol(torch.float32, "kernel"))
        assert torch.equal(got[j][slots < 0], ys[j][slots < 0])


def popularity_with_gaps(B, S, g):
    s = torch.randint(0, S, (B,), generator=g)
    s[torch.rand(B, generator=g) < 0.3] = -1
    s[:8] = 1  # one user repeats: tiles of several rows
    return s
