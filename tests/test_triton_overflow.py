"""Rows past 2**31 elements: Triton offsets are int64, so such rows are read and written where they are.
No 8 GB allocation: the tensors are strided views over a sparse file (only the touched pages exist)."""
import os

import pytest
import torch

from helpers import tol

from peftu_kernels.ops import reference as R
from peftu_kernels.triton.ia3 import ia3_into
from peftu_kernels.triton.lora import lora_

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the Triton interpreter on CPU tensors (a GPU run would need 8 GB)")

STRIDE_B = (1 << 30) + 48  # row 2 starts past 2**31 elements, while each stride still fits an int32


def sparse(tmp_path, name, L, D):
    """A (3, L, D) fp16 view whose row b starts at element b * STRIDE_B of a sparse file-backed storage."""
    n = 2 * STRIDE_B + L * D
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(n * 2)
    st = torch.from_file(str(path), shared=True, size=n, dtype=torch.float16)
    return torch.as_strided(st, (3, L, D), (STRIDE_B, D, 1))


def test_lora_rows_past_2_31_elements(tmp_path):
    g = torch.Generator().manual_seed(0)
    L, K, N, S, r = 5, 24, 20, 3, 4
    x, y = sparse(tmp_path, "x", L, K), sparse(tmp_path, "y", L, N)
    x.copy_(torch.randn(3, L, K, generator=g).half())
    y0 = torch.randn(3, L, N, generator=g).half()
    A, B = (torch.randn(S, r, K, generator=g) / 5).half(), (torch.randn(S, N, r, generator=g) / 2).half()
    scale, slots = torch.rand(S, generator=g) + 0.5, torch.tensor([2, 0, 1])
    want = R.lora(y0.float(), x.float(), A.float(), B.float(), scale, slots)
    assert (want[2] - y0[2].float()).abs().max() > 0.05  # the adapter changes row 2
    for fused in (True, False):
        y.copy_(y0)
        got = lora_(y, x, A, B, scale, slots, fused=fused)
        assert got.data_ptr() == y.data_ptr()
        torch.testing.assert_close(y.float(), want, **tol(torch.float16))


def test_ia3_rows_past_2_31_elements(tmp_path):
    g = torch.Generator().manual_seed(1)
    L, D = 7, 40
    x, out = sparse(tmp_path, "x", L, D), sparse(tmp_path, "out", L, D)
    x.copy_(torch.randn(3, L, D, generator=g).half())
    out.fill_(float("nan"))  # poisoned: every element must be written
    vec, slots = (1 + torch.randn(2, D, generator=g)).half(), torch.tensor([-1, 0, 1])
    ia3_into(out, x, vec, slots)
    torch.testing.assert_close(out.float(), R.ia3_scale(x.float(), vec.float(), slots), **tol(torch.float16))


def test_slots_past_the_bank_and_ranks_past_its_width_read_nothing_outside():
    """The engine never hands these out (BatchMeta checks slots on the host); a direct caller who does gets
    rows left unchanged and ranks clamped to the bank's width, never a read past the bank."""
    g = torch.Generator().manual_seed(2)
    S, R_, K, N = 2, 4, 16, 18
    x, y = torch.randn(3, 5, K, generator=g), torch.randn(3, 5, N, generator=g)
    A, B = torch.randn(S, R_, K, generator=g) / 4, torch.randn(S, N, R_, generator=g) / 4
    scale, slots, rank = torch.ones(S), torch.tensor([7, 1, -1]), torch.tensor([R_ + 9, R_ + 1])
    got = lora_(y.clone(), x, A, B, scale, slots, rank)
    want = R.lora(y, x, A, B, scale, torch.tensor([-1, 1, -1]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
