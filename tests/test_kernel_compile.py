"""Every Triton kernel compiles for real GPUs (sm_80 and sm_90), at every specialization the package launches,
within a resource budget; the CUDA sources too. Without a GPU: Triton 3.6 builds cubins through ptxas for a
GPUTarget, nvcc compiles csrc/ (peftu_kernels/triton/compile.py, benchmarks/kernel_resources.py)."""
import shutil

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from benchmarks.kernel_resources import cuda_usage  # noqa: E402
from helpers import tol  # noqa: E402
from peftu_kernels import ops  # noqa: E402
from peftu_kernels.ops.segments import make_segments  # noqa: E402
from peftu_kernels.triton.compile import (ARCHS, compile_specs, distinct, gpu_configs, kernels, problems,  # noqa: E402
                                          record, usage_from_text)
from peftu_kernels.triton.exercise import exercise  # noqa: E402


def compiled(dtypes, candidates):
    with record() as rec:
        exercise(rec, dtypes, candidates)
    specs = distinct(list(rec.specs.values()))
    return specs, compile_specs(specs, ARCHS)


@pytest.fixture(scope="module")
def results():
    """fp32 (training, fp32 serving) and bf16 (GPU serving) at the heuristics' configs: ~150 specializations, two
    targets, about 2.5 minutes on 2 cores from a cold Triton cache. fp16 and the autotune candidates: -m slow."""
    return compiled(("float32", "bfloat16"), candidates=False)


def test_every_kernel_is_launched_by_the_exercise(results):
    specs, _ = results
    seen = {f"{s['module']}.{s['name']}" for s in specs}
    assert set(kernels()) <= seen, f"kernels never launched, so never compiled: {sorted(set(kernels()) - seen)}"


def test_every_specialization_compiles_within_budget(results):
    specs, res = results
    assert len(res) == len(specs) * len(ARCHS) and len(specs) > 100
    assert {r["arch"] for r in res} == set(ARCHS) and all(r["ok"] for r in res)
    bad = problems(res)
    assert not bad, f"{len(bad)} problems:\n" + "\n".join(bad[:10])


@pytest.mark.slow
def test_fp16_and_every_autotune_candidate_compile():
    specs, res = compiled(("float16", "float32", "bfloat16"), candidates=True)
    assert any(s["tag"] == "candidate" for s in specs)
    bad = problems(res)
    assert not bad, f"{len(bad)} problems:\n" + "\n".join(bad[:10])


def test_a_kernel_the_interpreter_accepts_but_the_compiler_refuses_fails_the_check():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).parent / "fixtures" / "broken_kernels.py"
    spec = importlib.util.spec_from_file_location("broken_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with record() as rec:  # under the interpreter both would run
        mod._small_dot_kernel[(1,)](torch.ones(64), torch.ones(64), torch.empty(64), BLOCK=8)
        mod._runtime_arange_kernel[(1,)](torch.ones(16), 16)
    res = compile_specs(list(rec.specs.values()), (90,), workers=1)
    bad = problems(res)
    assert len(bad) == 2 and all("does not compile" in b for b in bad), bad
    assert any("_small_dot_kernel" in b for b in bad) and any("_runtime_arange_kernel" in b for b in bad)


def test_the_budget_flags_spills_and_shared_memory():
    base = {"spec": {"name": "k", "constexprs": {}, "num_warps": 4, "tag": "heuristic"}, "arch": 80, "ok": True,
            "regs": 255, "spill_stores": 0, "spill_loads": 0, "shared": 1024}
    assert problems([base]) == []
    assert "spills" in problems([{**base, "spill_stores": 64}])[0]
    assert "shared memory" in problems([{**base, "shared": 200_000}])[0]
    assert problems([{**base, "spill_loads": 64, "spec": {**base["spec"], "tag": "candidate"}}]) == []  # reported
    log = ("ptxas info    : Function properties for k\n    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill "
           "loads\nptxas info    : Used 40 registers, used 1 barriers, 16 bytes smem, 400 bytes cmem[0]")
    assert usage_from_text(log) == {"regs": 40, "spill_stores": 4, "spill_loads": 12, "stack": 8, "static_shared": 16}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: csrc/ is compiled to read its resources")
def test_cuda_kernels_do_not_spill():
    rows = cuda_usage(ARCHS)
    assert {r["arch"] for r in rows} == set(ARCHS) and len(rows) >= 2 * len(ARCHS)
    bad = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not bad, bad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("L,R", [(1, 8), (1, 192), (40, 8), (40, 192)])
def test_the_gpu_configs_compute_the_reference(dtype, L, R):
    """The block sizes and warps the launchers pick for a GPU (register-fitted, e.g. BLOCK_K 16 for stacked ranks),
    run by the interpreter: every op equals the reference, forward and (fp32) backward."""
    g = torch.Generator().manual_seed(L + R)
    B, K, N, S = 6, 72, 40, 3
    slots = torch.tensor([0, 2, -1, 2, 1, 0])
    seg = make_segments(slots)
    x, y = torch.randn(B, L, K, generator=g).to(dtype), torch.randn(B, L, N, generator=g).to(dtype)
    A, Bw = (torch.randn(S, R, K, generator=g) / 9).to(dtype), (torch.randn(S, N, R, generator=g) / 9).to(dtype)
    scale, rank = torch.rand(S, generator=g) + 0.5, torch.full((S,), R)
    down, up = (torch.randn(S, 20, K, generator=g) / 9).to(dtype), (torch.randn(S, K, 20, generator=g) / 5).to(dtype)
    db, ub = torch.randn(S, 20, generator=g).to(dtype), torch.randn(S, K, generator=g).to(dtype)
    cases = {"lora": (y, x, A, Bw, scale, slots, rank, seg), "adapter": (x, x, down, db, up, ub, "gelu", slots, seg),
             "dora": (y, x, A, Bw, scale, torch.rand(S, N, generator=g) + 0.5, slots, rank, seg)}
    for op, args in cases.items():
        want = ops.get(op)(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
        with gpu_configs():
            got = ops.get(op, "triton")(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
        torch.testing.assert_close(got, want, **tol(dtype, "kernel"), msg=lambda m: f"{op} L={L} R={R}: {m}")
    if dtype == torch.float32:  # training: the weight gradients through seg_outer / seg_rowsum
        for backend in ("reference", "triton"):
            a, b = A.clone().requires_grad_(True), Bw.clone().requires_grad_(True)
            with gpu_configs():
                ops.get("lora", backend)(y, x, a, b, scale, slots, rank, seg).square().sum().backward()
            if backend == "reference":
                ga, gb = a.grad, b.grad
        torch.testing.assert_close(a.grad, ga, **tol(dtype, "kernel"))
        torch.testing.assert_close(b.grad, gb, **tol(dtype, "kernel"))
