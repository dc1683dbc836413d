"""The one activation table: every backend uses its codes and functions (T5, reference, Triton, CUDA)."""
from pathlib import Path

import pytest
import torch

from helpers import tol
from peftu_kernels import activations
from peftu_kernels.ops import reference as R

CSRC = Path(__file__).resolve().parent.parent / "csrc" / "activations.cuh"


HOST_MAIN = r"""
#include <stdio.h>
#include "activations.cuh"
int main() {
  for (int code = 0; code < %(codes)d; ++code)
    for (int i = 0; i < %(n)d; ++i) printf("%%d %%.9g\n", code, act_fn(-6.f + 12.f * i / (%(n)d - 1), code));
  return 0;
}
"""


def test_cuda_switch_computes_the_table():
    """csrc/activations.cuh's act_fn (the adapter kernel's switch), compiled by nvcc for the host and run: each
    code's values equal the table's torch function for that code on [-6, 6]; a code past the table is identity."""
    import shutil
    import subprocess
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found: the CUDA switch is compiled for the host to check it")
    codes = {activations.code(n): activations.canonical(n) for n in activations.NAMES}
    n = 97
    tmp = Path(__import__("tempfile").mkdtemp())
    (tmp / "main.cu").write_text(HOST_MAIN % {"codes": max(codes) + 2, "n": n})
    subprocess.run(["nvcc", "-I", str(CSRC.parent), "-o", str(tmp / "act"), str(tmp / "main.cu")], check=True,
                   capture_output=True)
    out = subprocess.run([str(tmp / "act")], check=True, capture_output=True, text=True).stdout.split()
    vals = torch.tensor([float(v) for v in out[1::2]]).view(-1, n)
    x = torch.linspace(-6, 6, n)
    for code, name in codes.items():
        torch.testing.assert_close(vals[code], activations.fn(name)(x), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"case {code} of act_fn is not {name}: {m}")
    torch.testing.assert_close(vals[max(codes) + 1], x)  # the default


def test_aliases_and_unknown_names():
    assert activations.fn("swish") is activations.fn("silu") and activations.code("swish") == activations.code("silu")
    assert not activations.known("softsign") and not activations.known(None)
    with pytest.raises(KeyError, match="known"):
        activations.fn("softsign")


@pytest.mark.parametrize("name", activations.NAMES)
def test_triton_adapter_kernel_computes_each_activation(name):
    pytest.importorskip("triton", reason="triton is not installed")
    from peftu_kernels.triton.adapter import adapter_into
    g = torch.Generator().manual_seed(0)
    S, M, D, B, L = 2, 5, 12, 3, 4
    h, res = torch.randn(B, L, D, generator=g), torch.randn(B, L, D, generator=g)
    down, up = torch.randn(S, M, D, generator=g), torch.randn(S, D, M, generator=g) * 0.3
    db, ub = torch.randn(S, M, generator=g), torch.randn(S, D, generator=g)
    slots = torch.tensor([1, -1, 0])
    got = adapter_into(torch.empty_like(res), h, res, down, db, up, ub, name, slots)
    torch.testing.assert_close(got, R.adapter(h, res, down, db, up, ub, name, slots), **tol(torch.float32, "kernel"))
