"""The one activation table: every backend uses its codes and functions (T5, reference, Triton, CUDA)."""
import re
from pathlib import Path

import pytest
import torch

from helpers import tol
from peftu_kernels import activations
from peftu_kernels.ops import reference as R

CSRC = Path(__file__).resolve().parent.parent / "csrc" / "adapter.cu"


def test_cuda_switch_follows_the_table():
    """csrc/adapter.cu's act_fn: case <code> carries the table's name for that code (a comment), and every
    code of the table has its case; identity is the default."""
    cases = {int(c): line for c, line in re.findall(r"case (\d+): (.*)", CSRC.read_text())}
    for name in activations.NAMES:
        canon, code = activations.canonical(name), activations.code(name)
        if canon == "identity":
            assert code == 0
            continue
        assert code in cases, f"no case {code} for {canon} in {CSRC.name}"
        assert re.search(rf"//.*\b{re.escape(canon)}\b", cases[code]), f"case {code} is not {canon}: {cases[code]}"
    assert set(cases) == {activations.code(n) for n in activations.NAMES} - {0}


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
