"""csrc/ compiles and links for sm_80 and sm_90 (warnings are errors); the ops check their inputs."""
import shutil
import subprocess

import pytest
import torch

from helpers import tol
from peftu_kernels import cuda

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not installed")


@needs_nvcc
def test_every_cu_compiles_and_links_for_sm80_and_sm90(tmp_path):
    lib = cuda.build(tmp_path)
    assert lib.is_file()
    syms = subprocess.run(["nm", "-D", str(lib)], capture_output=True, text=True).stdout
    for name in ("peftu_lora_shrink", "peftu_lora_expand", "peftu_adapter", "peftu_error_string"):
        assert f" T {name}" in syms, name
    ninja = (lib.parent / "build.ninja").read_text()
    for src in cuda.sources():  # every file is built, for both architectures
        assert f"{src.stem}.o: cu {src}" in ninja
    assert "code=sm_80" in ninja and "code=sm_90" in ninja
    assert "code=compute_90" in ninja  # PTX too, for GPUs newer than the newest SASS
    blob = lib.read_bytes()  # the fat binary names the architectures it holds
    assert b"sm_80" in blob and b"sm_90" in blob
    assert cuda.build(tmp_path) == lib  # unchanged sources: no rebuild


@needs_nvcc
def test_a_broken_source_fails_the_build(tmp_path, monkeypatch):
    bad = tmp_path / "csrc"
    bad.mkdir()
    for f in cuda.CSRC.iterdir():
        (bad / f.name).write_text(f.read_text())
    (bad / "broken.cu").write_text('#include "common.cuh"\n__global__ void k(int* p) { int unused; p[0] = 1 }\n')
    monkeypatch.setattr(cuda, "CSRC", bad)
    with pytest.raises(RuntimeError, match="building the CUDA kernels failed"):
        cuda.build(tmp_path / "cache")


def test_fake_implementations_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        y, x = torch.empty(3, 5, 7), torch.empty(3, 5, 9)
        A, B = torch.empty(4, 2, 9), torch.empty(4, 7, 2)
        out = torch.ops.peftu.lora(y, x, A, B, torch.empty(4), torch.empty(3, dtype=torch.long),
                                   torch.empty(4, dtype=torch.long))
        assert out.shape == (3, 5, 7)
        h = torch.empty(2, 3, 8)
        out = torch.ops.peftu.adapter(h, h, torch.empty(4, 5, 8), torch.empty(4, 5), torch.empty(4, 8, 5),
                                      torch.empty(4, 8), "relu", torch.empty(2, dtype=torch.long))
        assert out.shape == h.shape


def test_inputs_are_checked_before_any_launch():
    y, x = torch.zeros(2, 3, 4), torch.zeros(2, 3, 6)
    A, B = torch.zeros(5, 2, 6), torch.zeros(5, 4, 2)
    s, r = torch.zeros(2, dtype=torch.long), torch.full((5,), 2)
    with pytest.raises(ValueError, match="peftu::lora: x must be a CUDA tensor"):
        cuda.lora_op(y, x, A, B, torch.ones(5), s, r)
    with pytest.raises(ValueError, match=r"peftu::lora: .* do not fit"):
        cuda.lora_op(y, x, A[:, :, :5], B, torch.ones(5), s, r)
    with pytest.raises(ValueError, match="activation 'mish'"):
        cuda.adapter_op(y, y, torch.zeros(1, 2, 4), torch.zeros(1, 2), torch.zeros(1, 4, 2), torch.zeros(1, 4), "mish", s)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_ops_match_reference(dtype):
    from peftu_kernels.ops import reference as R
    g = torch.Generator().manual_seed(0)
    B_, L, K, N, ranks = 6, 9, 40, 33, [1, 16, 3, 64]
    S, Rm = len(ranks), max(ranks)
    A, Bw = torch.randn(S, Rm, K, generator=g) / 7, torch.randn(S, N, Rm, generator=g) / 8
    for s, r in enumerate(ranks):
        A[s, r:], Bw[s, :, r:] = 0, 0
    x, y = torch.randn(B_, L, K, generator=g), torch.randn(B_, L, N, generator=g)
    slots, scale = torch.tensor([0, -1, 3, 3, 1, 2]), torch.rand(S, generator=g) + 0.5
    t = tol(dtype, "kernel")
    c = lambda t: t.cuda().to(dtype)
    got = cuda.lora(c(y), c(x), c(A), c(Bw), scale.cuda(), slots.cuda(), torch.tensor(ranks).cuda())
    torch.testing.assert_close(got.float().cpu(), R.lora(y, x, A, Bw, scale, slots), **t)
    down, up = torch.randn(S, 5, K, generator=g) / 6, torch.randn(S, K, 5, generator=g) / 2
    db, ub = torch.randn(S, 5, generator=g), torch.randn(S, K, generator=g)
    got = cuda.adapter(c(x), c(x), c(down), c(db), c(up), c(ub), "silu", slots.cuda())
    torch.testing.assert_close(got.float().cpu(), R.adapter(x, x, down, db, up, ub, "silu", slots), **t)


def test_training_through_the_cuda_backend_is_refused_clearly():
    """It has no backward: a gradient through it must fail loudly, never be silently zero."""
    y, x = torch.zeros(2, 3, 4), torch.zeros(2, 3, 6, requires_grad=True)
    A, B = torch.zeros(5, 2, 6), torch.zeros(5, 4, 2)
    with pytest.raises(RuntimeError, match="no backward: train with backend='triton' or 'reference'"):
        cuda.lora(y, x, A, B, torch.ones(5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="no backward"):
        cuda.adapter(x, x, torch.zeros(1, 2, 6), torch.zeros(1, 2), torch.zeros(1, 6, 2), torch.zeros(1, 6), "relu",
                     torch.zeros(2, dtype=torch.long))


@pytest.mark.gpu
def test_cuda_ops_run_on_their_tensors_device_and_take_float32_banks():
    """A tensor on another device than the current one runs there (device guard); float32 banks under 16-bit
    activations are accepted, as by the Triton backend; out-of-range slots are skipped, never read."""
    from peftu_kernels.ops import reference as R
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 5, 24, generator=g), torch.randn(3, 5, 20, generator=g)
    A, B = torch.randn(2, 4, 24, generator=g) / 5, torch.randn(2, 20, 4, generator=g) / 2
    slots, scale = torch.tensor([1, 0, -1]), torch.tensor([0.5, 2.0])
    want = R.lora(y, x, A, B, scale, slots)
    with torch.no_grad():
        got = cuda.lora(y.to(dev, torch.float16), x.to(dev, torch.float16), A.to(dev), B.to(dev), scale.to(dev),
                        slots.to(dev))
    torch.testing.assert_close(got.float().cpu(), want, **tol(torch.float16, "kernel"))
